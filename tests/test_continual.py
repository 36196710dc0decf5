"""Continual pre-training: stages chain, resume inside a stage is exact, mixtures and replay are
realised as requested, the forgetting report is right, and optimizer state keep/reset does what
it says."""

import json
import signal
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, system_dep
from stagewise.checkpoint import latest_checkpoint, load_checkpoint
from stagewise.config.loader import load_recipe
from stagewise.config.schema import OptimConfig, ScheduleConfig, SourceConfig
from stagewise.data import SequenceSampler, iter_documents, sources
from stagewise.data.mixture import MixtureSampler
from stagewise.errors import ConfigError, DataError
from stagewise.eval.forgetting import forgetting_report
from stagewise.model import Transformer
from stagewise.optim import build_optimizer, lr_at
from stagewise.rundir import load_model_config, read_metrics
from stagewise.train.stages import mixture_probs

EMAIL = Path(sysconfig.get_paths()["stdlib"]) / "email"
TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes"}


def staged_recipe(path: Path, corpus: Path, cache: Path, out_dir: Path, reset: bool = False) -> Path:
    """Two stages on two real corpora: 8 steps of Python from the stdlib, then 10 of the email package
    with 25% replay of the first domain, a re-warmed WSD schedule and a new peak LR."""
    path.write_text(f"""
name: cp
out_dir: {out_dir}
seed: 7
threads: 2
model: {{d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 128}}
data:
  tokenizer: {{vocab_size: 512}}
  cache_dir: {cache}
  seq_len: 64
  val_fraction: 0.1
train: {{batch_size: 8}}
optim: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 3, batches: 2}}
checkpoint: {{every: 5, keep_last: 3}}
log: {{progress: plain, every: 5}}
stages:
  - name: code
    steps: 8
    mixture: [{{name: code, source: {{kind: text, path: {corpus}}}}}]
  - name: email
    steps: 10
    replay: 0.25
    optimizer_state: {"reset" if reset else "keep"}
    optim: {{lr: 1.0e-3}}
    schedule: {{name: wsd, warmup_steps: 3, decay_fraction: 0.4}}
    mixture: [{{name: email, source: {{kind: text, path: {EMAIL}, glob: "*.py"}}}}]
""")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus_dir, data_cache):
    root = tmp_path_factory.mktemp("continual")
    recipe = staged_recipe(root / "cp.yaml", corpus_dir, data_cache, root / "runs")
    run_cli("run", recipe, "--name=reference")
    return root, recipe


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_stages_chain_with_global_steps_and_one_lr_curve(setup):
    root, _ = setup
    run = root / "runs" / "reference"
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 19))
    assert [r["stage"] for r in recs] == [0] * 8 + [1] * 10
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[7] == pytest.approx(3e-4)  # stage 0: cosine to 0.1 * peak
    # stage 1 re-warms to its own peak over 3 steps, holds it, then decays over its last 4 steps
    assert lrs[8:11] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lrs[11:14] == pytest.approx([1e-3] * 3) and lrs[17] == pytest.approx(1e-4)
    # every domain seen so far is evaluated on eval steps and at each stage's end
    assert set(k for k in recs[7] if k.startswith("val_loss/")) == {"val_loss/code"}
    assert set(k for k in recs[17] if k.startswith("val_loss/")) == {"val_loss/code", "val_loss/email"}
    for name in ("code", "email"):
        assert (run / "stages" / name / "model.safetensors").is_file()
    final, last_stage = load_file(run / "final" / "model.safetensors"), load_file(run / "stages/email/model.safetensors")
    assert all(final[k].equal(last_stage[k]) for k in final)
    report = json.loads((run / "forgetting.json").read_text())
    assert report["domains"] == ["code", "email"] and report["stages"] == ["code", "email"]
    assert report["matrix"][0] == [recs[7]["val_loss/code"], None]
    assert report["matrix"][1] == [recs[17]["val_loss/code"], recs[17]["val_loss/email"]]


def test_realised_replay_is_logged_and_matches(setup):
    root, _ = setup
    recs = _records(root / "runs" / "reference")
    last = recs[-1]
    n = 10 * 8  # sequences drawn in stage 1
    assert abs(last["replay"] - 0.25) * n < 2 and last["replay"] == last["mix/code"]
    assert last["mix/email"] + last["mix/code"] == pytest.approx(1.0)


@pytest.mark.parametrize("kill_at, resumes_from", [(13, "step_00000010"), (8, "step_00000008")])
def test_kill_inside_stage_or_at_boundary_then_resume_is_bitwise(setup, kill_at, resumes_from):
    root, recipe = setup
    name = f"killed{kill_at}"
    proc = run_cli("run", recipe, f"--name={name}", env={"STAGEWISE_DEBUG_KILL_AT_STEP": str(kill_at)}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run = root / "runs" / name
    out = run_cli("resume", run).stdout
    assert "in stage 1 (email)" in out and resumes_from in out
    ref = root / "runs" / "reference"
    assert _records(run) == _records(ref)  # every loss, LR, grad norm, val loss and mixture share
    for part in ("final", "stages/code", "stages/email"):
        wa, wb = load_file(ref / part / "model.safetensors"), load_file(run / part / "model.safetensors")
        assert all(wa[k].equal(wb[k]) for k in wa), part
    assert json.loads((run / "forgetting.json").read_text()) == json.loads((ref / "forgetting.json").read_text())


def test_precision_change_at_the_boundary_resumes_bitwise(setup):
    root, recipe = setup
    pure = ["--stages[1].precision=bf16-pure"]  # fp32 stage, then bf16 weights and moments (moments kept)
    run_cli("run", recipe, "--name=pure", *pure)
    proc = run_cli("run", recipe, "--name=pure_killed", *pure, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "12"},
                   check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", root / "runs" / "pure_killed")
    ref, run = root / "runs" / "pure", root / "runs" / "pure_killed"
    assert _records(run) == _records(ref)
    wa, wb = load_file(ref / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert all(wa[k].dtype == torch.bfloat16 and wa[k].equal(wb[k]) for k in wa)
    assert load_file(ref / "stages/code/model.safetensors")["norm.weight"].dtype == torch.float32


def _adam_steps(run_dir: Path) -> set:
    model = Transformer(load_model_config(run_dir))
    opt = build_optimizer(OptimConfig(), model, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(run_dir / "checkpoints"), model, opt)
    return {float(s["step"]) for s in opt.state.values()}


def test_optimizer_state_keep_vs_reset_at_the_boundary(setup, corpus_dir, data_cache):
    root, _ = setup
    recipe = staged_recipe(root / "reset.yaml", corpus_dir, data_cache, root / "runs", reset=True)
    run_cli("run", recipe, "--name=reset")
    assert _adam_steps(root / "runs" / "reference") == {18.0}  # keep: AdamW's count runs on
    assert _adam_steps(root / "runs" / "reset") == {10.0}  # reset: it restarted at the boundary
    keep, reset = _records(root / "runs" / "reference"), _records(root / "runs" / "reset")
    # identical up to the first update of stage 1 (its loss and gradient come before that update)
    assert keep[:8] == reset[:8]
    assert (keep[8]["loss"], keep[8]["grad_norm"]) == (reset[8]["loss"], reset[8]["grad_norm"])
    assert keep[9]["loss"] != reset[9]["loss"]


def _domain_of_batches(mix, n_batches):
    out = []
    for _ in range(n_batches):
        x, _ = mix.next_batch()
        out.extend(int(v) for v in x[:, 0])
    return np.array(out)


@pytest.mark.parametrize("replay", [0.0, 0.01, 0.05, 0.25])
def test_mixture_realises_requested_proportions_deterministically(replay):
    # Three domains whose tokens are their own id, so every sequence tells where it came from:
    # 0 and 1 are the stage's own (weights 0.7 / 0.3), 2 the replayed one.
    probs = {0: (1 - replay) * 0.7, 1: (1 - replay) * 0.3, 2: replay}
    probs = {str(k): v for k, v in probs.items() if v > 0}

    def build():
        samplers = {str(d): SequenceSampler(np.full(1000, d, dtype=np.uint16), 16, 1, seed=d) for d in range(3)}
        return MixtureSampler({k: samplers[k] for k in probs}, probs, batch_size=8, stage=1)

    a = build()
    seqs = _domain_of_batches(a, 50)
    for d, p in probs.items():  # within (number of domains) sequences of the exact share, at every prefix
        counts = np.cumsum(seqs == int(d))
        assert np.all(np.abs(counts - p * np.arange(1, len(seqs) + 1)) < len(probs)), (d, p)
        assert a.fractions()[d] == pytest.approx(p, abs=len(probs) / len(seqs))
    # resumable: a sampler restored from the state after 20 batches continues identically
    b = build()
    _domain_of_batches(b, 20)
    c = build()
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert np.array_equal(_domain_of_batches(c, 30), seqs[20 * 8:])


def test_mixture_probs_split_replay_over_earlier_domains(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
data: {seq_len: 64}
model: {max_seq_len: 128}
schedule: {warmup_steps: 7}
stages:
  - {name: a, tokens: 100000, mixture: [{name: x, source: {kind: python-stdlib}}, {name: y, weight: 3, source: {kind: shakespeare}}]}
  - {name: b, steps: 20, replay: 0.05, schedule: {name: infinite}, mixture: [{name: z, source: {kind: python-docs}}, {name: y, weight: 0, source: {kind: shakespeare}}]}
""")
    cfg = load_recipe(recipe)
    assert mixture_probs(cfg, 0) == pytest.approx({"x": 0.25, "y": 0.75})
    assert mixture_probs(cfg, 1) == pytest.approx({"z": 0.95, "x": 0.05})  # y is in b's mixture, weight 0
    assert cfg.stages[1].schedule.warmup_steps == 7  # stage sections inherit the recipe's keys
    assert cfg.stages[1].schedule.name == "infinite" and cfg.stages[0].schedule.name == "cosine"


@pytest.mark.parametrize("stages, message", [
    ("[{name: a, steps: 5, tokens: 9, mixture: [{name: x, source: {kind: shakespeare}}]}]", "exactly one of"),
    ("[{name: a, steps: 5, replay: 0.1, mixture: [{name: x, source: {kind: shakespeare}}]}]", r"stages\[0\]\.replay"),
    ("[{name: a, steps: 5, mixture: [{name: x, weight: 0, source: {kind: shakespeare}}]}]", "weight > 0"),
    ("[{name: a, steps: 5, mixture: [{name: x, source: {kind: shakespeare}}]},"
     " {name: a, steps: 5, mixture: [{name: x, source: {kind: shakespeare}}]}]", r"stages\[1\]\.name"),
    ("[{name: a, steps: 5, mixture: [{name: x, source: {kind: shakespeare}}]},"
     " {name: b, steps: 5, mixture: [{name: x, source: {kind: python-docs}}]}]", "another source"),
    ("[{name: a, steps: 5, mixture: [{name: x, source: {kind: shakespeare}}]},"
     " {name: b, steps: 5, replay: 0.2, mixture: [{name: x, source: {kind: shakespeare}}]}]", "nothing|no earlier"),
])
def test_inconsistent_stages_fail_with_one_line(tmp_path, stages, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{seq_len: 64}}\nmodel: {{max_seq_len: 128}}\nschedule: {{warmup_steps: 1}}\n"
                      f"stages: {stages}\n")
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(recipe)
    assert "\n" not in str(e.value)


def test_infinite_schedule_cooldown():
    cfg = ScheduleConfig(name="infinite", warmup_steps=2, min_lr_ratio=0.1, cooldown_steps=4)
    assert [lr_at(s, 1.0, 10, cfg) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])  # never cools
    cooled = [lr_at(s, 1.0, 10, cfg, cooldown_start=3) for s in range(9)]
    assert cooled == pytest.approx([0.5, 1, 1, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1])


def test_cooldown_file_ends_an_infinite_stage_and_survives_resume(setup, corpus_dir, data_cache):
    root, _ = setup
    text = staged_recipe(root / "inf.yaml", corpus_dir, data_cache, root / "runs").read_text()
    text = text.replace("{name: wsd, warmup_steps: 3, decay_fraction: 0.4}",
                        "{name: infinite, warmup_steps: 1, cooldown_steps: 3}").replace("steps: 10", "steps: 100")
    (root / "inf.yaml").write_text(text)
    # the reference: the same cooldown, fixed in the recipe (2 steps into stage 1)
    (root / "inf_ref.yaml").write_text(text.replace("cooldown_steps: 3}", "cooldown_steps: 3, cooldown_at_step: 2}"))
    run_cli("run", root / "inf_ref.yaml", "--name=inf_ref")
    proc = run_cli("run", root / "inf.yaml", "--name=inf", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "12"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run = root / "runs" / "inf"
    (run / "COOLDOWN").touch()
    # resumes at step 10, sees the file before step 11 (checkpointing the trigger), dies after step 11
    proc = run_cli("resume", run, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "11"}, check=False)
    assert proc.returncode == -signal.SIGKILL and not (run / "COOLDOWN").exists()
    run_cli("resume", run)  # from the trigger's checkpoint: the cooldown is remembered, not re-read
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 14))  # 10 + 3 cooldown steps, not 108
    assert [r["lr"] for r in recs[8:]] == pytest.approx([1e-3, 1e-3, 0.7e-3, 0.4e-3, 1e-4])
    assert recs == _records(root / "runs" / "inf_ref")
    wa, wb = load_file(run / "final/model.safetensors"), load_file(root / "runs/inf_ref/final/model.safetensors")
    assert all(wa[k].equal(wb[k]) for k in wa)


@system_dep(sources.PYTHON_DOCS_ROOT.is_dir(), "python3.11-doc")
def test_python_docs_source():
    docs = list(iter_documents(SourceConfig(kind="python-docs"), "src"))
    assert len(docs) > 100 and any(d.doc_id == "library/functions.rst.txt" for d in docs)


def test_python_docs_missing_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "PYTHON_DOCS_ROOT", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install python3.11-doc") as e:
        list(iter_documents(SourceConfig(kind="python-docs"), "src"))
    assert "\n" not in str(e.value)


def test_forgetting_report_on_a_constructed_history():
    def ev(step, stage, **losses):
        return {"step": step, "stage": stage, **{f"val_loss/{k}": v for k, v in losses.items()}}

    history = [
        {"step": 1, "stage": 0}, ev(2, 0, a=3.0), ev(4, 0, a=2.0),                       # stage 0 ends at a=2.0
        ev(6, 1, a=2.5, b=4.0), ev(8, 1, a=2.75, b=3.0), ev(10, 1, a=1.75, b=2.0),       # peak +0.75 at 8, back by 10
        ev(12, 2, a=1.5, b=2.5, c=5.0), {"step": 13, "stage": 2}, ev(14, 2, a=2.25, b=2.25, c=4.0),
    ]
    r = forgetting_report(history, ["s0", "s1", "s2"], ["a", "b", "c"])
    assert r["matrix"] == [[2.0, None, None], [1.75, 2.0, None], [2.25, 2.25, 4.0]]
    assert r["forgetting"] == [[0.0, None, None], [0.0, 0.0, None], [0.5, 0.25, 0.0]]
    gaps = {(g["stage"], g["domain"]): g for g in r["stability_gap"]}
    assert set(gaps) == {(1, "a"), (2, "a"), (2, "b")}
    assert gaps[1, "a"] == {"stage": 1, "domain": "a", "boundary_step": 4, "boundary_loss": 2.0,
                            "peak_rise": 0.75, "peak_step": 8, "recover_steps": 6}
    assert gaps[2, "a"]["peak_rise"] == 0.5 and gaps[2, "a"]["recover_steps"] is None  # never back to 1.75
    assert gaps[2, "b"]["peak_rise"] == 0.5 and gaps[2, "b"]["peak_step"] == 12
    assert gaps[2, "b"]["recover_steps"] is None  # 2.25 at step 14 is still above the boundary's 2.0


def test_continual_recipe_is_valid():
    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "continual.yaml")
    assert [s.name for s in cfg.stages] == ["code", "plays", "docs"]
    assert [s.replay for s in cfg.stages] == [0.0, 0.05, 0.05]
    assert mixture_probs(cfg, 2) == pytest.approx({"docs": 0.95, "python": 0.025, "shakespeare": 0.025})
