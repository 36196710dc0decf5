"""Loss spikes and runs of non-finite steps: roll back to an in-memory snapshot and skip the data.

The logbooks of large pre-training runs (PaLM, Chowdhery et al. 2022, section 5.1; OPT-175B's
chronicles) deal with a loss spike by restarting from a checkpoint some steps before it and
skipping the batches that were fed around it. With `spikes.action: rollback` this is automatic and
needs no disk: a `Snapshot` (checkpoint/snapshot.py) of the whole train state is kept in CPU
memory, and when a step's loss spikes, or `nonfinite_steps` steps in a row are non-finite, the
model, optimizer, counters, precision state, RNG and loss window go back to it while the batch
source does not: the batches drawn since the snapshot are skipped, never trained on again.

A spike is a loss above median + threshold * 1.4826 * MAD over the last `window` accepted losses
(1.4826 * MAD estimates a normal distribution's standard deviation, and unlike it is not inflated
by the spike itself), and at least min_rise above the median. The window, the non-finite streak
and the log of rollbacks are train-state parts, so a resume judges every later step as the
uninterrupted run did; because every checkpoint is also a snapshot point, a crash resumed from a
checkpoint rolls back to the same steps; a stop by signal between snapshots saves the newest
snapshot (rewind), not the current step, for the same reason.
"""

from __future__ import annotations

import math
import os
import statistics

from stagewise.checkpoint.snapshot import Snapshot, restore_snapshot, take_snapshot
from stagewise.errors import StagewiseError

# Test hook: "N:FACTOR,M:nan": the N-th step the stage executes (counted from 1, undone steps
# included, so a rolled-back batch is never poisoned twice) has its loss multiplied by FACTOR.
INJECT_ENV = "STAGEWISE_TEST_INJECT_LOSS"


class TrainingDiverged(StagewiseError):
    """Rollbacks did not help: the run stops with its checkpoints intact."""


class LossWindow:
    """The train-state part "spikes": recent accepted losses and the current non-finite streak."""

    def __init__(self, cfg, loss_scaled: bool):
        self.cfg, self.loss_scaled = cfg, loss_scaled
        self.losses: list[float] = []
        self.streak = 0

    def judge(self, loss: float, applied: bool) -> str | None:
        """Take one step's loss; the reason to roll back, or None (the loss then joins the window)."""
        cfg = self.cfg
        # With loss scaling a skipped update is an fp16 overflow the scaler recovers from, not a divergence.
        if not math.isfinite(loss) or not (applied or self.loss_scaled):
            self.streak += 1
            if self.streak >= cfg.nonfinite_steps:
                return f"{self.streak} non-finite step{'s' if self.streak > 1 else ''} in a row"
            return None
        self.streak = 0
        if len(self.losses) >= cfg.min_history:
            limit, median, mad = spike_limit(self.losses, cfg.threshold, cfg.min_rise)
            if loss > limit:
                return (f"loss {loss:.4g} above {limit:.4g} (median {median:.4g} + {cfg.threshold:g} x 1.4826 x "
                        f"MAD {mad:.3g}, min_rise {cfg.min_rise:g})")
        self.losses = (self.losses + [loss])[-cfg.window:]
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.streak = [float(x) for x in state["losses"]], int(state["streak"])


def spike_limit(losses: list[float], threshold: float, min_rise: float) -> tuple[float, float, float]:
    """(the loss above which a step is a spike, the window's median, its MAD)."""
    median = statistics.median(losses)
    mad = statistics.median([abs(x - median) for x in losses])
    return max(median + threshold * 1.4826 * mad, median + min_rise * abs(median)), median, mad


class RollbackLog:
    """The train-state part "rollbacks": every rollback so far and the steps executed (undone ones
    included). A rollback restores every other part; this one it keeps."""

    def __init__(self):
        self.events: list[dict] = []
        self.executed = 0

    def state_dict(self) -> dict:
        return {"events": [dict(e) for e in self.events], "executed": self.executed}

    def load_state_dict(self, state: dict) -> None:
        self.events, self.executed = [dict(e) for e in state["events"]], int(state["executed"])


class SpikeGuard:
    """Owns the snapshot and decides, after each step, whether to roll back (docs/guide.md)."""

    KEEP = ("source", "rollbacks")  # what a rollback leaves as it is: the data moves on, the log grows

    def __init__(self, cfg, trainee, state, stage_index: int):
        self.cfg, self.trainee, self.state, self.stage_index = cfg, trainee, state, stage_index
        self.window = LossWindow(cfg, loss_scaled=getattr(trainee.precision, "name", "") == "fp16-mixed")
        self.log = RollbackLog()
        state.register("spikes", self.window)
        state.register("rollbacks", self.log)
        self.snapshot: Snapshot | None = None
        self.after_take = None  # (step) -> None, called after each snapshot (the trackers' commit)
        self._inject = _parse_inject(os.environ.get(INJECT_ENV, ""))

    def take(self, step: int) -> None:
        t = self.trainee
        self.snapshot = None  # freed before the next is copied: one snapshot in memory, as the plan counts
        self.snapshot = take_snapshot(step, t.model, t.optimizer, self.state.state_dict(), t.adapter is not None)
        if self.after_take is not None:
            self.after_take(step)

    def periodic(self, step: int) -> None:
        if step % self.cfg.snapshot_every == 0:
            self.take(step)

    def objective(self, objective):
        """The objective of the step about to run: the stage's, or the test hook's scaled copy (counted once
        per executed step)."""
        self.log.executed += 1
        factor = self._inject.get(self.log.executed)
        return objective if factor is None else _Scaled(objective, factor)

    def judge(self, result) -> str | None:
        """result: () -> the step's host StepResult; reading it waits for the step (the one place the guard
        costs time on a GPU: the next step is launched after this step's loss is known)."""
        r = result()
        self.window.loss_scaled = getattr(self.trainee.precision, "name", "") == "fp16-mixed"  # after a switch too
        return self.window.judge(r.loss, r.applied)

    def rollbacks_in(self, stage_index: int) -> int:
        return sum(e.get("stage") == stage_index for e in self.log.events)

    def stop_point(self, step: int, metrics) -> int:
        """Where a stop by signal at `step` saves: the snapshot when it is older (rewound to, metrics.jsonl cut
        back to it), so that the resumed run is the uninterrupted one."""
        if self.snapshot.step < step:
            self.rewind()
            metrics.truncate(self.snapshot.step)
        return self.snapshot.step

    def rewind(self) -> int:
        """Everything back to the snapshot, the batch source and the log included: the state the run had
        at that step (a stop by signal saves it, so that the resumed run is the uninterrupted one)."""
        t = self.trainee
        self.state.load_state_dict(restore_snapshot(self.snapshot, t.model, t.optimizer), list(self.state.parts))
        return self.snapshot.step

    def roll_back(self, step: int, reason: str, grad_accum: int) -> dict:
        """Restore the snapshot (all but the source and the log); the event, as metrics.jsonl records it."""
        if self.rollbacks_in(self.stage_index) >= self.cfg.max_rollbacks:
            raise TrainingDiverged(f"step {step}: {reason}, after {self.cfg.max_rollbacks} rollbacks in this stage "
                                   f"(spikes.max_rollbacks); the checkpoints are intact: lower optim.lr, raise "
                                   "spikes.threshold or check the data, then resume")
        snap, t = self.snapshot, self.trainee
        saved = restore_snapshot(snap, t.model, t.optimizer)
        self.state.load_state_dict(saved, [n for n in self.state.parts if n not in self.KEEP])
        event = {"from_step": step, "to_step": snap.step, "reason": reason,
                 "skipped_batches": (step - snap.step) * grad_accum, "stage": self.stage_index}
        self.log.events.append(event)
        return event


class NoGuard:
    """spikes.action none: the same calls, doing nothing (and never reading a step's result early)."""

    after_take = None

    def take(self, step: int) -> None:
        pass

    periodic = take

    def objective(self, objective):
        return objective

    def judge(self, result) -> None:
        return None

    def rollbacks_in(self, stage_index: int) -> int:
        return 0

    def stop_point(self, step: int, metrics) -> int:
        return step


def build_guard(cfg, trainee, state, stage_index: int):
    return SpikeGuard(cfg, trainee, state, stage_index) if cfg.action == "rollback" else NoGuard()


class _Scaled:
    """An objective whose loss is multiplied by `factor` (the INJECT_ENV test hook)."""

    def __init__(self, objective, factor: float):
        self.objective, self.factor = objective, factor

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, model, batch):
        out = self.objective(model, batch)
        return out._replace(loss_sum=out.loss_sum * self.factor)


def _parse_inject(text: str) -> dict[int, float]:
    out = {}
    for item in filter(None, text.split(",")):
        n, factor = item.split(":")
        out[int(n)] = float(factor)
    return out
