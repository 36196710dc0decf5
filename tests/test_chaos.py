"""Chaos: one two-stage run killed again and again at moments drawn at random (a fixed seed, so a
failure reproduces): right after a step, inside a checkpoint write (before its rename), or SIGKILL
after a random delay (anywhere: start-up, a step, a save, the stage boundary's export, the final
export). After every kill the run is resumed; at the end its metrics, stage exports and final weights
must be bitwise those of the same run never interrupted."""

import os
import random
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from stagewise.rundir import read_metrics
from test_continual import staged_recipe

pytestmark = pytest.mark.slow
KILLS = 24


def _weights(path):
    return load_file(path / "model.safetensors")


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def _lines(run):
    timing = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run / "metrics.jsonl")]


def _progress(run) -> int:
    """The step of the run's newest complete checkpoint (0 before the first)."""
    from stagewise.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints") if run.is_dir() else None
    return int(ckpt.name.split("_")[1]) if ckpt else 0


def test_a_run_killed_at_random_moments_ends_bitwise_equal(tmp_path, corpus_dir, data_cache):
    recipe = staged_recipe(tmp_path / "cp.yaml", corpus_dir, data_cache, tmp_path / "runs")
    every = ["--checkpoint.every=1"]
    run_cli("run", recipe, "--name=reference", *every)
    reference, run = tmp_path / "runs" / "reference", tmp_path / "runs" / "chaos"
    rng = random.Random(18)
    moments = []
    while len(moments) < KILLS and not (run / "final").is_dir():
        at = _progress(run)
        how = rng.choice(["after-step", "in-save", "timer"])
        if not (run / "config.yaml").is_file():
            how = "after-step"  # a timer could stop `run` before its run directory is whole (a new name next time)
        env = dict(os.environ)
        if how == "after-step":  # the step after the newest checkpoint
            env["STAGEWISE_DEBUG_KILL_AT_STEP"] = str(min(18, at + 1))
        elif how == "in-save":
            env["STAGEWISE_TEST_KILL_DURING_SAVE"] = str(min(18, at + 1))
        args = ["resume", run] if (run / "config.yaml").is_file() else ["run", recipe, "--name=chaos", *every]
        proc = subprocess.Popen([sys.executable, "-m", "stagewise", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        if how == "timer":
            try:
                proc.wait(timeout=rng.uniform(0.2, 2.8))
            except subprocess.TimeoutExpired:
                proc.kill()
        out, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            continue  # it finished before the timer (or the kill point was behind it)
        assert proc.returncode == -9, f"{how}: exit {proc.returncode}\n{err[-2000:]}"
        moments.append((how, at))
    if not (run / "final").is_dir():
        run_cli("resume", run)
    print("kills (how, newest checkpoint step):", moments)
    assert len(moments) >= 20 and len({how for how, _ in moments}) == 3, (len(moments), moments)
    assert any(at >= 8 for _, at in moments), moments  # some in the second stage, after the boundary
    assert _lines(run) == _lines(reference)
    for stage in ("code", "email"):
        assert _same(run / "stages" / stage, reference / "stages" / stage)
    assert _same(run / "final", reference / "final")
    assert (run / "forgetting.json").read_text() == (reference / "forgetting.json").read_text()
