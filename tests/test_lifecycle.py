"""A cut-down recipes/lifecycle.yaml end to end: pre-training -> continual pre-training (replay, a precision
change) -> SFT -> DPO with LoRA (precomputed reference) -> GRPO, in one run directory.

- killed inside each stage kind (an lm step, an sft step, the DPO reference precompute, a DPO step, the
  LoRA merge of the DPO stage's export, a GRPO rollout) and resumed each time: metrics, every stage's
  export and the final weights bitwise equal to the uninterrupted run;
- forgetting.json's table has a value for every (stage, column introduced at or before it) pair, equal
  to the stage's last value of that key in metrics.jsonl, and none before;
- the end-of-run printout names every stage with its headline numbers and prints the table.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import STDLIB, run_cli
from stagewise.eval.headline import format_headlines, format_table, stage_headlines
from stagewise.rundir import read_metrics

pytestmark = pytest.mark.slow

TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes", "pairs_per_s", "examples_per_s",
          "rollout/seconds", "rollout/overhead_s", "rollout/tokens_per_s", "rollout/gen_share"}
STAGES = [("code", "lm"), ("prose", "lm"), ("chat", "sft"), ("pref", "dpo"), ("grpo", "rl")]


def lifecycle_recipe(tmp_path, corpus_dir, data_cache, name="life", out_dir=None):
    prose = tmp_path / "prose"
    prose.mkdir(exist_ok=True)
    for f in sorted((STDLIB / "email").glob("*.py"))[:12]:
        if not (prose / f.name).exists():
            shutil.copy(f, prose / f.name)
    recipe = (out_dir or tmp_path) / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(f"""
name: {name}
out_dir: {out_dir or tmp_path / 'runs'}
seed: 3
threads: 2
model: {{d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 128}}
data: {{tokenizer: {{vocab_size: 512, split_digits: true}}, cache_dir: {data_cache}, seq_len: 64}}
train: {{batch_size: 4}}
schedule: {{warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 3, batches: 2}}
checkpoint: {{every: 3, keep_last: 2}}
log: {{progress: plain}}
sft: {{arithmetic: &a {{ops: [add], min_digits: 1, max_digits: 2, format: reversed, train_count: 200, val_count: 16}},
      eval_generate: 4, eval_max_new_tokens: 6}}
dpo: {{arithmetic: *a, eval_generate: 4, eval_max_new_tokens: 6, data: [{{kind: arithmetic}}]}}
rl: {{arithmetic: *a, train_problems: 64, eval_problems: 4, prompts_per_rollout: 2, group_size: 2, max_new_tokens: 6}}
stages:
  - {{name: code, steps: 6, mixture: [{{name: python, source: {{kind: text, path: {corpus_dir}}}}}]}}
  - {{name: prose, steps: 6, replay: 0.25, precision: bf16-mixed, schedule: {{name: wsd, warmup_steps: 2}},
     mixture: [{{name: email, source: {{kind: text, path: {prose}}}}}]}}
  - {{name: chat, kind: sft, steps: 6, sft: {{data: [{{kind: arithmetic}}]}}}}
  - {{name: pref, kind: dpo, steps: 6, optim: {{lr: 1.0e-4}}, adapter: {{kind: lora, r: 4}},
     dpo: {{reference: precomputed}}}}
  - {{name: grpo, kind: rl, steps: 6, optim: {{lr: 1.0e-4}}}}
sample: {{prompts: ["12+34="], max_new_tokens: 6}}
""")
    return recipe


def _lines(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]


def _same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, data_cache):
    tmp = tmp_path_factory.mktemp("lifecycle")
    out = run_cli("run", lifecycle_recipe(tmp, corpus_dir, data_cache)).stdout
    return tmp / "runs" / "life", out


def test_forgetting_table_covers_every_stage_and_earlier_column(reference):
    run, _ = reference
    history = read_metrics(run / "metrics.jsonl")
    report = json.loads((run / "forgetting.json").read_text())
    table = report["table"]
    keys = [c["key"] for c in table["columns"]]
    assert keys == ["val_bpb/python", "val_bpb/email", "val_bpb/chat", "exact_match/chat", "exact_match/pref",
                    "exact_match/grpo"]
    assert [c["stage"] for c in table["columns"]] == [0, 1, 2, 2, 3, 4]
    assert report["stages"] == [s for s, _ in STAGES]
    for i, (values, drops) in enumerate(zip(table["values"], table["forgetting"])):
        rows = [r for r in history if r.get("stage") == i]
        for c, v, d in zip(table["columns"], values, drops):
            if c["stage"] > i:
                assert v is None and d is None
                continue
            logged = [r[c["key"]] for r in rows if c["key"] in r]
            assert logged and v == logged[-1], (i, c["key"])  # recomputed from metrics.jsonl
            so_far = [table["values"][k][keys.index(c["key"])] for k in range(c["stage"], i + 1)]
            want = max(so_far) - v if c["higher_is_better"] else v - min(so_far)
            assert d == pytest.approx(want) and d >= 0
    # exact_match/<stage> inside the stage is the stage's own exact_match
    for r in history:
        for name in ("chat", "pref", "grpo"):
            if f"exact_match/{name}" in r and r["stage"] == [s for s, _ in STAGES].index(name):
                assert r[f"exact_match/{name}"] == r["exact_match"]


def test_end_of_run_printout(reference):
    run, out = reference
    heads = stage_headlines(read_metrics(run / "metrics.jsonl"), STAGES)
    assert [h["name"] for h in heads] == [s for s, _ in STAGES]
    assert set(heads[1]["numbers"]) == {"val_bpb/python", "val_bpb/email"}
    assert set(heads[2]["numbers"]) == {"val_bpb/chat", "exact_match"}
    assert set(heads[3]["numbers"]) == {"val_rewards/accuracies", "exact_match"}
    assert set(heads[4]["numbers"]) == {"val_reward", "exact_match", "reward/mean"}
    for line in format_headlines(heads) + format_table(json.loads((run / "forgetting.json").read_text())):
        assert line in out
    assert out.index("headline numbers") < out.index("chat sample") < out.index("forgetting matrix")


def test_killed_inside_every_stage_kind_resumes_bitwise(reference, tmp_path, corpus_dir):
    ref, _ = reference
    # its own data cache: the reference run's cached reference log-probs would skip the precompute
    recipe = lifecycle_recipe(tmp_path, corpus_dir, tmp_path / "cache")
    run = tmp_path / "runs" / "life"
    # one kill per process: lm step 8 (stage prose), sft step 16, the DPO reference precompute, DPO step 22,
    # the LoRA merge of pref's export, the second GRPO rollout
    kills = [{"STAGEWISE_DEBUG_KILL_AT_STEP": "8"}, {"STAGEWISE_DEBUG_KILL_AT_STEP": "16"},
             {"STAGEWISE_DEBUG_KILL_IN_PRECOMPUTE": "1"}, {"STAGEWISE_DEBUG_KILL_AT_STEP": "22"},
             {"STAGEWISE_DEBUG_KILL_IN_MERGE": "pref"}, {"STAGEWISE_DEBUG_KILL_IN_ROLLOUT": "2"}]
    for n, env in enumerate(kills):
        args = ("run", recipe) if n == 0 else ("resume", run)
        proc = run_cli(*args, env=env, check=False)
        assert proc.returncode == -9, (env, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        if "STAGEWISE_DEBUG_KILL_IN_MERGE" in env:  # no half-written export of the merged weights
            assert not (run / "stages" / "pref").exists() and (run / "stages" / "chat").is_dir()
    run_cli("resume", run)
    assert _lines(run) == _lines(ref)
    for name, _ in STAGES:
        assert _same_weights(run / "stages" / name, ref / "stages" / name), name
    assert _same_weights(run / "final", ref / "final")
    assert (run / "forgetting.json").read_text() == (ref / "forgetting.json").read_text()


def test_from_stage_reuses_the_earlier_stages(reference, tmp_path, corpus_dir, data_cache):
    ref, _ = reference
    # the reference's data (the same paths), new runs under tmp_path/runs
    recipe = lifecycle_recipe(ref.parent.parent, corpus_dir, data_cache, out_dir=tmp_path / "runs")
    # unchanged: the re-run of pref and grpo is the earlier run, bitwise
    out = run_cli("run", recipe, "--from-stage", "pref", "--reuse", ref).stdout
    assert f"reused from {ref}" in out
    again = tmp_path / "runs" / "life"
    assert _lines(again) == _lines(ref)
    assert _same_weights(again / "final", ref / "final")
    assert (again / "forgetting.json").read_text() == (ref / "forgetting.json").read_text()
    # a later stage changed: the stages before it are the earlier run's, the changed one differs
    run_cli("run", recipe, "--from-stage", "grpo", "--reuse", ref, "--stages[4].optim.lr=3.0e-3")
    changed = tmp_path / "runs" / "life-2"
    boundary = max(r["step"] for r in read_metrics(ref / "metrics.jsonl") if r["stage"] == 3)
    assert [r for r in _lines(changed) if r["step"] <= boundary] == [r for r in _lines(ref) if r["step"] <= boundary]
    assert _lines(changed) != _lines(ref)
    assert not _same_weights(changed / "final", ref / "final")
    # an earlier stage changed, an unknown stage, the first stage: one line each, nothing written
    for args, msg in [(["--from-stage", "pref", "--stages[1].replay=0.5"], "stage 'prose' would not be the one"),
                      (["--from-stage", "nope"], "no stage 'nope' in the recipe"),
                      (["--from-stage", "code"], "is the first stage")]:
        proc = run_cli("run", recipe, "--reuse", ref, *args, check=False)
        assert proc.returncode != 0 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "runs" / "life-3").exists()
