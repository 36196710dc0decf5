"""Experiment trackers (issue 18, part 4): what TensorBoard, wandb (offline) and MLflow hold, read back with
each library's own reader (TensorBoard's EventAccumulator, wandb's protobuf Records, MlflowClient), equals
metrics.jsonl line for line; a killed and resumed run continues the same tracker runs with every step once."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics
from stagewise.trackers import flat_params, scalars, wandb_history

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = "--log.to=[jsonl,tensorboard,wandb,mlflow]"
# Measured, not computed: a resumed run's replay of a step the trackers hold already is not sent again, so
# they keep the killed run's timing of it (every other field is the same bits)
TIMING = {"tokens_per_s", "mfu", "peak_mem_bytes", "step_time_s"}


def _tensorboard(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stagewise").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one tracker run for the run directory, resumes too
    return client, runs[0]


def _check_against_metrics(run_dir, config_lr: float, resumed: bool = False):
    lines = read_metrics(run_dir / "metrics.jsonl")
    if resumed:
        lines = [{k: v for k, v in r.items() if k not in TIMING} for r in lines]
    steps = [r["step"] for r in lines]
    assert steps == list(range(1, 21))
    names = {k for r in lines for k in scalars(r)}
    assert {"loss", "lr", "grad_norm", "val_loss"} <= names

    tb = _tensorboard(run_dir)
    assert set(tb) >= names
    for name in names:
        want = [(r["step"], r[name]) for r in lines if name in r]
        got = tb[name]
        assert [s for s, _ in got] == [s for s, _ in want], name  # every step once: the purge hid none twice
        for (_, a), (_, b) in zip(got, want):  # TensorBoard keeps float32
            assert a == pytest.approx(float(b), rel=1e-6, abs=1e-30) or (math.isnan(a) and math.isnan(b)), name

    state = json.loads((run_dir / "trackers.json").read_text())
    rows = wandb_history(run_dir, state["wandb_id"])
    assert [int(r["_step"]) for r in rows] == steps
    for row, line in zip(rows, lines):
        assert {k: row[k] for k in scalars(line)} == scalars(line)  # JSON numbers: the same doubles

    client, run = _mlflow(run_dir)
    assert float(run.data.params["optim.lr"]) == config_lr and run.data.params["model.d_model"] == "64"
    assert run.info.status == "FINISHED"
    for name in ("loss", "val_loss", "grad_norm"):
        hist = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(r["step"], r[name]) for r in lines if name in r]


@pytest.mark.slow
def test_trackers_hold_metrics_jsonl_and_resume_without_duplicates(corpus_dir, data_cache, tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    run_cli("run", recipe, "--name=whole", ALL)
    whole = tmp_path / "runs" / "whole"
    _check_against_metrics(whole, 3e-3)

    # killed after the step-10 checkpoint: steps 11-13 were sent (or, for wandb, perhaps never reached its
    # file); the resume replays them bit for bit and sends each tracker only what it lacks
    proc = run_cli("run", recipe, "--name=cut", ALL, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "13"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cut = tmp_path / "runs" / "cut"
    run_cli("resume", cut)
    _check_against_metrics(cut, 3e-3, resumed=True)
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert len(list((cut / "wandb").glob("offline-run-*"))) == 2  # the resume continued the same wandb id


@pytest.mark.slow
def test_trackers_never_show_a_rolled_back_step(corpus_dir, data_cache, tmp_path):
    """A spike at step 14 rolls back to the step-12 snapshot: the trackers hold the steps as metrics.jsonl
    keeps them (the replayed 13 and 14), not the undone ones."""
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    run_cli("run", recipe, "--name=spiky", ALL, "--spikes.action=rollback", "--spikes.snapshot_every=4",
            "--spikes.min_history=5", env={"STAGEWISE_TEST_INJECT_LOSS": "14:1000"})
    run_dir = tmp_path / "runs" / "spiky"
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [r.get("rollbacks") for r in lines if "rollback" in r] == [1]
    assert max(r["loss"] for r in lines) < 100  # the spike itself was undone
    _check_against_metrics(run_dir, 3e-3)


def test_tracker_errors_are_one_line_before_the_run_dir(corpus_dir, data_cache, tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    for override, message in [("--log.to=[jsonl,neptune]", "log.to[1]: expected one of jsonl, tensorboard"),
                              ("--log.to=[wandb,wandb]", "log.to[1]: wandb is listed twice"),
                              ("--log.project=a/b", "log.project: expected letters")]:
        proc = run_cli("run", recipe, "--name=bad", override, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "runs").exists()


def test_log_list_shorthand_and_flat_params():
    from stagewise.config.loader import from_dict
    from stagewise.config.schema import RunConfig

    cfg = from_dict(RunConfig, {"log": ["jsonl", "tensorboard"], "data": {"sources": [{"kind": "text", "path": "x"}]}})
    assert cfg.log.to == ["jsonl", "tensorboard"] and cfg.log.every == 10
    flat = flat_params({"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "stages": [{"name": "a"}, {"name": "b"}],
                        "init_from": None})
    assert flat == {"optim.lr": 1e-3, "optim.betas": "[0.9, 0.95]", "stages.0.name": "a", "stages.1.name": "b",
                    "init_from": "null"}
    assert scalars({"step": 3, "loss": 2.5, "skipped": True, "rollback": [{}], "stage": "sft"}) == \
        {"loss": 2.5, "skipped": 1.0}
