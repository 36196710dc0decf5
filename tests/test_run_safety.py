"""Runs that survive anything (issue 18, part 1): what a resume still owes after the final checkpoint, one
run or resume per run directory, damaged and incomplete checkpoints skipped by name, recipe edits between
start and resume, interrupts during a save, a full disk. Every run is a real `stagewise` subprocess."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, corpus_dir, data_cache):
    root = tmp_path_factory.mktemp("safety")
    recipe = tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs")
    run_cli("run", recipe, "--name=reference")
    return root, recipe


def steps(run):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]


def same_final(a, b):
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_resume_writes_the_export_a_run_still_owes(job):
    root, recipe = job
    run = root / "runs" / "owed"
    killed = run_cli("run", recipe, "--name=owed", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "20"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "step_00000020").is_dir() and not (run / "final").exists()
    out = run_cli("resume", run).stdout
    assert "writing what the run still owes: final" in out and "--- sample" in out
    assert same_final(run, root / "runs" / "reference") and steps(run) == steps(root / "runs" / "reference")
    assert "run already complete" in run_cli("resume", run).stdout  # and nothing is owed any more


def test_a_staged_run_gets_its_last_stage_export_and_forgetting_row(tmp_path, corpus_dir, data_cache):
    from test_continual import staged_recipe

    recipe = staged_recipe(tmp_path / "cp.yaml", corpus_dir, data_cache, tmp_path / "runs")
    run = tmp_path / "runs" / "cp"
    run_cli("run", recipe, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "18"}, check=False)
    assert not (run / "stages" / "email").exists()
    run_cli("resume", run)
    assert (run / "stages" / "email" / "model.safetensors").is_file() and (run / "final").is_dir()
    assert json.loads((run / "forgetting.json").read_text())["stages"] == ["code", "email"]


def test_one_process_per_run_directory(job):
    root, recipe = job
    first = subprocess.Popen([sys.executable, "-m", "stagewise", "run", str(recipe), "--name=busy",
                              "--train.steps=100000", "--checkpoint.every=0", "--eval.every=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = root / "runs" / "busy"
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        proc = run_cli("resume", run, check=False)
        assert proc.returncode == 2 and len(error_lines(proc)) == 1
        assert f"is in use by process {first.pid}" in proc.stderr
        lines = (run / "metrics.jsonl").read_text().count("\n")
        time.sleep(1.0)
        assert (run / "metrics.jsonl").read_text().count("\n") >= lines  # the holder's metrics were not truncated
    finally:
        first.kill()
        first.wait()
    from stagewise.rundir import RunLock

    RunLock(run).release()  # the kernel dropped the killed holder's lock: no stale lock is left


def _killed_at_13(root, recipe, name):
    run = root / "runs" / name
    run_cli("run", recipe, f"--name={name}", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "13"}, check=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    return run


@pytest.mark.parametrize("damage", ["no-metadata", "truncated-shard", "flipped-byte"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(job, damage):
    root, recipe = job
    run = _killed_at_13(root, recipe, f"damaged-{damage}")
    newest = run / "checkpoints" / "step_00000010"
    shard = newest / "__0_0.distcp"
    if damage == "no-metadata":
        (newest / ".metadata").unlink()
    elif damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    out = run_cli("resume", run)
    reason = {"no-metadata": "no .metadata", "truncated-shard": "were saved; the file is truncated",
              "flipped-byte": "does not match the checksum"}[damage]
    skipped = [line for line in (out.stdout + out.stderr).splitlines() if "skipping checkpoint step_00000010" in line]
    assert len(skipped) == 1 and reason in skipped[0], out.stdout[-1500:]
    assert "from step_00000005" in out.stdout
    assert steps(run) == steps(root / "runs" / "reference") and same_final(run, root / "runs" / "reference")


def test_recipe_edits_between_start_and_resume(job):
    root, recipe = job
    run = _killed_at_13(root, recipe, "edited")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("d_model: 64", "d_model: 128"))
    proc = run_cli("resume", run, check=False)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "model.d_model was changed (64 -> 128)" in proc.stderr
    (run / "config.yaml").write_text(config.replace("batch_size: 8", "batch_size: 4"))
    assert "train.batch_size was changed (8 -> 4)" in run_cli("resume", run, check=False).stderr
    (run / "config.yaml").write_text(config.replace("keep_last: 3", "keep_last: 1"))
    out = run_cli("resume", run).stdout  # a safe edit: taken and named
    assert "checkpoint.keep_last changed since the run started (3 -> 1)" in out
    assert steps(run) == steps(root / "runs" / "reference")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000020"]


def test_a_double_ctrl_c_during_a_save_ends_as_documented(job):
    root, recipe = job
    run = root / "runs" / "interrupted"
    proc = run_cli("run", recipe, "--name=interrupted", env={"STAGEWISE_TEST_SIGINT_DURING_SAVE": "10"},
                   check=False)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "received SIGINT: saved" in proc.stdout and (run / "checkpoints" / "step_00000010").is_dir()
    run_cli("resume", run)
    assert steps(run) == steps(root / "runs" / "reference")


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from stagewise.checkpoint import latest_checkpoint, save_checkpoint
    from stagewise.errors import CheckpointError

    model = torch.nn.Linear(8, 8)
    save_checkpoint(tmp_path, 1, model, None, {}, keep_last=3)

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0") from e

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left on .*: the checkpoint needs ~0 MiB; the previous") as e:
        save_checkpoint(tmp_path, 2, model, None, {}, keep_last=3)
    assert "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]  # no partial directory left
