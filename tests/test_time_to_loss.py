"""bench/time_to_loss.py's analysis on a hand-built metrics.jsonl whose answers are known."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "time_to_loss.py"
_spec = importlib.util.spec_from_file_location("time_to_loss", _PATH)
ttl = importlib.util.module_from_spec(_spec)
sys.modules["time_to_loss"] = ttl  # dataclasses look their module up there
_spec.loader.exec_module(ttl)

# 8 steps of 100 tokens, 0.5 s each; evaluations at steps 2, 4, 6, 8. The train loss of step 3
# (3.0) is below 3.5 but is not a validation loss, so it must not count as a crossing.
VAL = {2: 5.0, 4: 3.9, 6: 3.4, 8: float("nan")}
TRAIN = {1: 6.0, 2: 5.5, 3: 3.0, 4: 4.0, 5: 3.8, 6: 3.6, 7: 3.5, 8: 3.4}


def _write(tmp_path: Path) -> Path:
    lines = []
    for step in range(1, 9):
        rec = {"step": step, "tokens": 100 * step, "loss": TRAIN[step], "step_time_s": 0.5}
        if step in VAL:
            rec["val_loss"] = VAL[step]
        lines.append(json.dumps(rec))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_first_eval_crossing(tmp_path):
    records = ttl.read_metrics(_write(tmp_path))
    c = ttl.time_to_target(records, 4.0)
    assert (c.step, c.tokens, c.val_loss) == (4, 400, 3.9)
    assert c.train_s == pytest.approx(2.0)  # 4 steps x 0.5 s
    c = ttl.time_to_target(records, 3.4)  # equality counts as reached
    assert (c.step, c.tokens, c.train_s) == (6, 600, pytest.approx(3.0))


def test_never_reached_names_the_best(tmp_path):
    records = ttl.read_metrics(_write(tmp_path))
    with pytest.raises(ttl.TimeToLossError, match=r"never reached 3: best 3\.4000 at step 6 of 8"):
        ttl.time_to_target(records, 3.0)  # the NaN at step 8 is neither a crossing nor the best


def test_summary_of_a_resumed_run(tmp_path):
    # Resumed from step 3: the trainer's MetricsLog drops the steps after the checkpoint and they are
    # logged again (step 4 now slower and with another val_loss), so each step is in the file once.
    from stagewise.train.metrics import MetricsLog

    path = _write(tmp_path)
    log = MetricsLog(path, resume_step=3)
    for step in range(4, 9):
        rec = {"step": step, "tokens": 100 * step, "loss": TRAIN[step], "step_time_s": 1.5 if step == 4 else 0.5}
        if step in VAL:
            rec["val_loss"] = 3.7 if step == 4 else VAL[step]
        log.write(rec)
    log.close()
    records = ttl.read_metrics(path)
    assert [r["step"] for r in records] == list(range(1, 9))
    s = ttl.summarize(records, [4.5, 3.8, 1.0])
    reached = [(t["target"], t.get("step"), t.get("train_s")) for t in s["targets"]]
    assert reached == [(4.5, 4, 3.0), (3.8, 4, 3.0), (1.0, None, None)]  # 3 x 0.5 s + 1.5 s
    assert s["best_val_loss"] == 3.4 and s["eval_every_tokens"] == 200 and s["final_step"] == 8


def test_errors_are_one_line(tmp_path, capsys):
    assert ttl.main(["--run-dir", str(tmp_path), "--no-record"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics" in err
    _write(tmp_path)
    assert ttl.main(["--run-dir", str(tmp_path), "--no-record", "--targets", "3.0"]) == 1
    assert capsys.readouterr().err.strip().endswith("best 3.4000 at step 6 of 8")
