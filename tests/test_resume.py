"""Exact resume: a run killed at any point and resumed equals the uninterrupted run, bit for bit.

Every run here is a real `stagewise` subprocess killed with a real signal.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus_dir, data_cache):
    root = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs")
    run_cli("run", recipe, "--name=reference")
    return root, recipe


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in
            read_metrics(run_dir / "metrics.jsonl")]


def _assert_same_run(a, b):
    la, lb = _losses(a), _losses(b)
    assert [s for s, *_ in la] == list(range(1, 21))
    assert la == lb  # exact float equality, every step
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), k


def test_sigkill_then_resume_is_bitwise_identical(setup):
    root, recipe = setup
    # Checkpoints at 5, 10; SIGKILL right after step 13: steps 11-13 must be redone identically.
    proc = run_cli("run", recipe, "--name=killed", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "13"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run = root / "runs" / "killed"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == 13
    assert not (run / "final").exists()
    out = run_cli("resume", run).stdout
    assert "resuming" in out and "step_00000010" in out
    _assert_same_run(root / "runs" / "reference", run)


def test_sigterm_saves_checkpoint_and_resume_matches(setup):
    root, recipe = setup
    run = root / "runs" / "termed"
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", "run", str(recipe), "--name=termed",
                             "--checkpoint.every=100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"step_{steps[-1]:08d}"]  # saved exactly where it stopped
    assert "stagewise resume" in out
    run_cli("resume", run)
    _assert_same_run(root / "runs" / "reference", run)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(setup):
    root, recipe = setup
    run = root / "runs" / "torn"
    # Dies inside the save at step 10, after tensors are written, before the rename.
    proc = run_cli("run", recipe, "--name=torn", env={"STAGEWISE_TEST_KILL_DURING_SAVE": "10"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert complete == ["step_00000005"]
    run_cli("resume", run)
    _assert_same_run(root / "runs" / "reference", run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resume_of_finished_run_is_a_no_op(setup):
    root, _ = setup
    out = run_cli("resume", root / "runs" / "reference").stdout
    assert "already complete" in out


def test_run_dir_contents(setup):
    root, _ = setup
    run = root / "runs" / "reference"
    for name in ("config.yaml", "model_config.json", "tokenizer.json", "run_info.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run_info.json").read_text())["threads"] == 2
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000015", "step_00000020"]  # keep_last: 3
    rec = read_metrics(run / "metrics.jsonl")[0]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"):
        assert key in rec
    assert rec["tokens"] == 8 * 64
