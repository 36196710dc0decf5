"""The dpo stage kind through the CLI: exact resume after SIGKILL (also during the reference
precompute), the three references giving one result, lm -> sft -> dpo forgetting, plan stating the
reference, and every bad input failing in one line, exit 2, with nothing written."""

import json
import re
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics

TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes", "pairs_per_s", "examples_per_s"}


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_dir, data_cache) -> Path:
    """A tiny pre-trained stagewise model (its BPE carries the ChatML tokens)."""
    d = tmp_path_factory.mktemp("base")
    recipe = tiny_recipe(d / "base.yaml", corpus_dir, data_cache, d / "runs")
    run_cli("run", recipe, "--train.steps=6", "--name=base")
    return d / "runs" / "base"


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_recipe(d: Path, init_from: Path, data: Path, extra: str = "") -> Path:
    p = d / "dpo.yaml"
    p.write_text(f"""
name: dpo
out_dir: {d / 'runs'}
seed: 3
threads: 2
kind: dpo
init_from: {init_from}
data: {{seq_len: 64, cache_dir: {d / 'cache'}}}
train: {{steps: 10, batch_size: 4}}
optim: {{lr: 1.0e-3}}
schedule: {{name: cosine, warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 5, batches: 2}}
checkpoint: {{every: 4, keep_last: 3}}
log: {{progress: plain, every: 5}}
dpo:
  data: [{{kind: jsonl, path: {data}}}, {{kind: arithmetic}}]
  val_fraction: 0.2
  arithmetic: {{train_count: 100, val_count: 16, format: plain}}
  eval_generate: 4
  eval_max_new_tokens: 6
{extra}
sample: {{prompts: ["What is 2 plus 2?"], max_new_tokens: 6}}
""")
    return p


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def test_dpo_resume_is_bitwise_also_after_a_kill_during_the_precompute(tmp_path, base):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(60))
    recipe = dpo_recipe(tmp_path, base, data, "  reference: precomputed")
    out = run_cli("run", recipe, "--name=full").stdout
    assert "computing the reference log-probs of" in out
    assert "--- chat sample (prompt 'What is 2 plus 2?') ---" in out
    full = read_metrics(tmp_path / "runs" / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(1, 11))
    first, last = full[0], full[-1]
    assert abs(first["loss"] - 0.693147) < 1e-4  # the policy starts as its reference: every log-ratio is 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in first
    assert abs(first["rewards/margins"] - (first["rewards/chosen"] - first["rewards/rejected"])) < 1e-9
    assert first["pairs_per_s"] > 0 and first["rewards/accuracies"] == 0  # no reward is above another yet
    assert {"val_loss", "val_rewards/accuracies", "val_rewards/margins", "exact_match"} <= set(last)

    proc = run_cli("run", recipe, "--name=killed", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli("resume", tmp_path / "runs" / "killed").stdout
    assert "reference log-probs from" in resumed  # the cache written before the kill is used, not recomputed
    assert _strip(read_metrics(tmp_path / "runs" / "killed" / "metrics.jsonl")) == _strip(full)

    other_cache = f"--data.cache_dir={tmp_path / 'cache2'}"
    proc = run_cli("run", recipe, "--name=killed-early", other_cache,
                   env={"STAGEWISE_DEBUG_KILL_IN_PRECOMPUTE": "2"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not list((tmp_path / "cache2").rglob("*.safetensors"))  # a killed pass leaves no cache
    assert "computing the reference log-probs" in run_cli("resume", tmp_path / "runs" / "killed-early").stdout
    assert _strip(read_metrics(tmp_path / "runs" / "killed-early" / "metrics.jsonl")) == _strip(full)
    want = _weights(tmp_path / "runs" / "full")
    for name in ("killed", "killed-early"):
        got = _weights(tmp_path / "runs" / name)
        assert all((got[k] == want[k]).all() for k in want)


def test_copy_and_precomputed_references_agree_and_lora_uses_no_copy(tmp_path, base):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(60))
    recipe = dpo_recipe(tmp_path, base, data)
    runs = {}
    for ref in ("copy", "precomputed"):
        run_cli("run", recipe, f"--name={ref}", f"--dpo.reference={ref}", "--train.steps=4", "--eval.every=0")
        runs[ref] = read_metrics(tmp_path / "runs" / ref / "metrics.jsonl")
    for a, b in zip(runs["copy"], runs["precomputed"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4
    plan = run_cli("plan", recipe, "--adapter.kind=lora", "--adapter.r=4").stdout
    assert re.search(r"reference: adapters-off", plan), plan[-2000:]
    run_cli("run", recipe, "--name=lora", "--adapter.kind=lora", "--adapter.r=4", "--train.steps=4")
    lora = read_metrics(tmp_path / "runs" / "lora" / "metrics.jsonl")
    assert abs(lora[0]["loss"] - 0.693147) < 1e-4 and lora[-1]["rewards/accuracies"] >= 0
    assert re.search(r"reference: copy .*fp32", run_cli("plan", recipe).stdout)
    run_cli("run", recipe, "--name=kto", "--dpo.loss=kto", "--train.steps=3", "--eval.every=0")
    kto = read_metrics(tmp_path / "runs" / "kto" / "metrics.jsonl")
    assert abs(kto[0]["loss"] - 0.5) < 1e-4  # 1 - sigmoid(0) per example while the policy is the reference
    assert {"kto/kl", "rewards/chosen", "rewards/rejected", "val_kto/kl"} <= set(kto[-1])


@pytest.mark.slow
def test_lm_sft_dpo_measures_forgetting_across_all_three(tmp_path, corpus_dir, data_cache):
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(f"""
name: staged
out_dir: {tmp_path / 'runs'}
seed: 5
threads: 2
model: {{d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 128}}
data: {{tokenizer: {{vocab_size: 512}}, cache_dir: {data_cache}, seq_len: 64}}
train: {{batch_size: 4}}
schedule: {{warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 4, batches: 2}}
checkpoint: {{every: 4}}
log: {{progress: plain}}
sft: {{arithmetic: {{train_count: 200, val_count: 16}}, eval_generate: 4, eval_max_new_tokens: 6}}
dpo: {{arithmetic: {{train_count: 200, val_count: 16}}, eval_generate: 4, eval_max_new_tokens: 6,
       data: [{{kind: arithmetic}}], loss: simpo}}
stages:
  - {{name: code, steps: 8, mixture: [{{name: python, source: {{kind: text, path: {corpus_dir}}}}}]}}
  - {{name: chat, kind: sft, steps: 8, sft: {{data: [{{kind: arithmetic}}]}}}}
  - {{name: pref, kind: dpo, steps: 8, optim: {{lr: 1.0e-4}}}}
sample: {{prompts: ["12+34="], max_new_tokens: 6}}
""")
    out = run_cli("run", recipe).stdout
    assert "chat sample" in out
    run = tmp_path / "runs" / "staged"
    forgetting = json.loads((run / "forgetting.json").read_text())
    assert forgetting["domains"] == ["python", "chat", "pref"]
    last = forgetting["matrix"][-1]
    assert all(isinstance(v, float) for v in last)  # the dpo stage measured the lm domain and the sft data too
    assert (run / "stages" / "pref" / "model.safetensors").is_file()


BAD_ROWS = {
    "same": ({"prompt": "q", "chosen": "It is 4.", "rejected": "It is 4."}, r"pairs\.jsonl:4: chosen and rejected"),
    "empty": ({"prompt": "q", "chosen": "", "rejected": "no"}, r"pairs\.jsonl:4: chosen is an empty response"),
    "missing": ({"prompt": "q", "chosen": "yes"}, r"pairs\.jsonl:4: no field 'rejected'"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_fail_in_one_line(tmp_path, base, case):
    row, pattern = BAD_ROWS[case]
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(3) + [row] + _pairs(3))
    proc = run_cli("run", dpo_recipe(tmp_path, base, data), check=False)
    _assert_one_line_error(proc, tmp_path, pattern)


def test_a_reference_cache_of_other_weights_is_refused(tmp_path, base):
    import numpy as np

    from stagewise.train.dpo_kind import cache_key, write_cache

    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(40))
    recipe = dpo_recipe(tmp_path, base, data, "  reference: precomputed")
    run_cli("run", recipe, "--name=first", "--train.steps=2", "--eval.every=0")
    (cache,) = (tmp_path / "cache" / "reference_logps").glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(cache), "np") as f:
        meta, table = f.metadata(), f.get_tensor("ref_logps")
    stale = tmp_path / "stale.safetensors"
    write_cache(stale, cache_key(meta["data"], "0" * 64, "float32", "fp32"), np.zeros_like(table))
    import shutil

    shutil.rmtree(tmp_path / "runs")
    proc = run_cli("run", recipe, f"--dpo.reference_cache={stale}", check=False)
    _assert_one_line_error(proc, tmp_path, r"reference_cache: .*stale\.safetensors was computed for other reference "
                                           r"weights")
    ok = run_cli("run", recipe, f"--dpo.reference_cache={cache}", "--name=reuse", "--train.steps=2").stdout
    assert "reference log-probs from" in ok


def test_config_errors_name_the_key(tmp_path, base):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(20))
    recipe = dpo_recipe(tmp_path, base, data)
    for args, pattern in ((["--dpo.reference=adapters-off"], r"dpo\.reference: adapters-off needs an adapter stage"),
                          (["--dpo.loss=simpo", "--dpo.reference=copy"], r"dpo\.reference: simpo is reference-free"),
                          (["--dpo.reference_dtype=bf16"], r"dpo\.reference_dtype: bf16 needs a bf16 compute"),
                          (["--dpo.loss=kto", "--dpo.sft_weight=1"], r"dpo\.sft_weight: applies to the pair losses")):
        _assert_one_line_error(run_cli("run", recipe, *args, check=False), tmp_path, pattern)


def _assert_one_line_error(proc, tmp_path: Path, pattern: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
