"""Real runs: every optimizer resumes bit for bit (with checkpointing and the memory probe on), memory.json and
the report's predicted-vs-measured table, and memory.limit stopping a run before anything is written."""

import json
import signal

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics

STEPS = ["--train.steps=8", "--schedule.warmup_steps=2", "--checkpoint.every=3", "--eval.every=4"]
CASES = {  # optimizer -> the extra settings it is resumed under
    "adamw": ["--train.activation_checkpointing=selective"],
    "adamw-8bit": [],
    "adamw-4bit": ["--precision.mode=bf16-mixed"],
    "galore": ["--train.activation_checkpointing=full", "--optim.update_proj_gap=3"],
    "galore-8bit": ["--optim.update_proj_gap=3"],
    "fira": ["--optim.update_proj_gap=3", "--train.activation_checkpointing=full", "--train.checkpoint_every=2"],
    "apollo": ["--optim.update_proj_gap=3", "--optim.targets=[feed_forward]"],
    "apollo-mini": ["--optim.update_proj_gap=3", "--precision.mode=bf16-mixed"],
    "muon": ["--precision.mode=bf16-mixed"],
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, corpus_dir, data_cache):
    root = tmp_path_factory.mktemp("memory_runs")
    return tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs"), root / "runs"


def _same(a, b):
    la = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(a / "metrics.jsonl")]
    lb = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(b / "metrics.jsonl")]
    assert [s for s, *_ in la] == list(range(1, 9)) and la == lb
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert all(wa[k].equal(wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_optimizer_resumes_bitwise(recipe, name):
    path, runs = recipe
    args = [*STEPS, f"--optim.name={name}", *CASES[name]]
    run_cli("run", path, f"--name={name}-ref", *args)
    # killed after step 5: the checkpoint at step 3 is resumed, steps 4-5 are redone (their probe step differs
    # from the reference run's: the probe changes nothing)
    proc = run_cli("run", path, f"--name={name}-kill", *args, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "5"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", runs / f"{name}-kill")
    _same(runs / f"{name}-ref", runs / f"{name}-kill")
    # the resumed process measured its own probe step: a restored optimizer holds the same bytes (8/4-bit
    # codes stay uint8 through torch's load_state_dict, which casts state to the parameter's dtype)
    resumed = json.loads((runs / f"{name}-kill" / "memory.json").read_text())[f"{name}-kill"]["measured"]
    assert resumed["at_step"] == 5
    memory = json.loads((runs / f"{name}-ref" / "memory.json").read_text())[f"{name}-ref"]
    assert memory["settings"]["optimizer"] == name
    pred, meas = memory["predicted"], memory["measured"]
    assert meas["at_step"] == 2 and pred["optimizer"] == meas["optimizer"] == resumed["optimizer"]
    for key in ("weights", "gradients", "activations", "loss_peak", "peak"):
        assert abs(pred[key] - meas[key]) <= 0.1 * meas[key], (key, pred[key], meas[key])


def test_memory_json_report_and_probe_flag(recipe):
    path, runs = recipe
    run_cli("run", path, "--name=probe", "--train.steps=4", "--schedule.warmup_steps=1", "--optim.name=apollo-mini",
            "--train.activation_checkpointing=full")
    assert json.loads((runs / "probe" / "memory.json").read_text())["probe"]["measured"]["at_step"] == 2
    out = run_cli("report", runs / "probe").stdout
    assert "memory (probe): predicted vs measured" in out
    line = next(ln for ln in out.splitlines() if "optimizer states" in ln)
    assert line.split()[-1] == "1.000"  # optimizer bytes predicted exactly
    html = (runs / "probe" / "report" / "index.html").read_text()
    assert "Memory: predicted vs measured" in html and "peak of tracked tensors" in html
    # memory.probe false: no measurement, the prediction is still recorded
    run_cli("run", path, "--name=noprobe", "--train.steps=2", "--schedule.warmup_steps=1", "--memory.probe=false")
    rec = json.loads((runs / "noprobe" / "memory.json").read_text())["noprobe"]
    assert "measured" not in rec and rec["predicted"]["peak"] > 0


def test_memory_limit_stops_before_anything_is_written(recipe):
    path, runs = recipe
    proc = run_cli("run", path, "--name=toolarge", "--memory.limit=64MiB", check=False)
    assert proc.returncode == 2 and not (runs / "toolarge").exists()
    assert proc.stderr.count("\n") == 1 and "error: memory: predicted peak" in proc.stderr
    assert "exceeds memory.limit 64.0 MiB by" in proc.stderr
    plan = run_cli("plan", path, "--memory.limit=64MiB").stdout
    assert "the run would stop before its first step" in plan
    bad = run_cli("run", path, "--name=x", "--optim.name=galore", "--precision.mode=bf16-pure", check=False)
    assert bad.returncode == 2 and "optim.name: galore needs fp32 weights" in bad.stderr
