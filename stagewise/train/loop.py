"""The one training loop: batch source -> train_step -> metrics / evaluation / checkpoint.

Every stage kind runs through `fit`; what differs between kinds lives in the `Stage` it is
given (train/stage.py). Starting and resuming are the same path: `fit` builds the model,
restores whatever checkpoint it is given into the registered train state, and loops.

Exact resume rests on three facts: everything that must survive a crash is registered in the
TrainState (train/state.py) and written with every checkpoint; the LR is a pure function of
the step; and metrics lines past the checkpoint are dropped on resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import torch

from stagewise import rundir
from stagewise.checkpoint.store import begin_checkpoint
from stagewise.config.schema import ModelConfig
from stagewise.distributed import WORLD, StepSync
from stagewise.memory import StageMemory
from stagewise.model import flops_per_token
from stagewise.precision.schedule import stage_due, switch_precision
from stagewise.train import setup
from stagewise.train.metrics import MetricsLog, NullMetricsLog, mfu, peak_flops, peak_memory_bytes
from stagewise.train.progress import Progress
from stagewise.train.spikes import NoGuard, SpikeGuard, build_guard
from stagewise.train.stage import Stage
from stagewise.train.state import Counters, RNGState, TrainState
from stagewise.train.step import train_step

# Test hook: SIGKILL this process right after the given step has been logged (and
# checkpointed, if due) — how the resume tests crash a run at an exact point; "N:TERM" sends SIGTERM.
KILL_AT_STEP_ENV = "STAGEWISE_DEBUG_KILL_AT_STEP"


class _StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint after the current step and exit."""

    def __init__(self):
        self.signum = None
        self._old = {}
        self._saving = False

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and not self._saving:  # a second Ctrl-C means "now" (not mid-save)
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def saving(self):
        """A checkpoint write: signals wait until it is published, then stop the run as usual."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class StepLog:
    """Writes each step's metrics line one step late: reading a step's loss waits for it, and by then
    the device already has the next step queued. Evaluation, checkpoints, signals, the kill hook and
    the end write it at once. step_time_s is thus launch to launch."""

    def __init__(self, stage: Stage, metrics: MetricsLog, progress: Progress, counters: Counters, fpt, peak):
        self.stage, self.metrics, self.progress, self.counters = stage, metrics, progress, counters
        self.fpt, self.peak, self.pending = fpt, peak, None
        self.note = {}  # fields the next line carries (a rollback's record)

    def queue(self, record: dict, result, t0: float) -> None:
        self.pending = [record, result, t0, None]

    def host(self):
        """The pending step's result as Python numbers (read once: waits for the step)."""
        if self.pending[3] is None:
            self.pending[3] = self.pending[1].host()
        return self.pending[3]

    def drop(self) -> None:
        """Forget the pending step: a rollback undid it."""
        self.pending = None

    def flush(self, t_end: float | None = None, evaluate=None) -> None:
        """Write the pending step's line; t_end None: the step's end, once .host() has waited for it.
        evaluate: () -> validation metrics for the line, run after the step's time is taken."""
        if self.pending is None:
            return
        r = self.host()
        record, _, t0, _ = self.pending
        self.pending = None
        self.counters.skipped_steps += not r.applied
        dt = (t_end or time.perf_counter()) - t0
        tok_s = record["step_tokens"] / dt
        record = {"step": record["step"], "tokens": record["tokens"], "loss": r.loss, "lr": record["lr"],
                  "grad_norm": r.grad_norm, "tokens_per_s": tok_s, "mfu": mfu(self.fpt, tok_s, self.peak),
                  "peak_mem_bytes": record["mem"], "step_time_s": dt, **record["extra"], **r.metrics, **self.note}
        self.note = {}
        unit = getattr(self.stage.objective, "unit", None)  # what the normaliser counts, when not tokens
        if unit:
            record[f"{unit}_per_s"] = r.num_targets / dt
        if not r.applied:
            record["skipped"] = True
            self.progress.message(f"step {record['step']}: non-finite gradient (norm {r.grad_norm}); update skipped")
        if evaluate is not None:
            record.update(evaluate())
        self.metrics.write(record)
        self.progress.update(record["step"], r.loss, tok_s, record["mfu"], record.get("val_loss"))


def fit(stage: Stage, mcfg: ModelConfig, device: torch.device, checkpoint: Path | None, log, trackers=None):
    """Train `stage` from `checkpoint` (None: from its start) to its end; returns the model, or None
    when the checkpoint is already at the stage's end. trackers: rank 0's experiment trackers."""
    cfg = stage.cfg
    if stage.prepare is not None:  # before the policy exists: a precompute's temporary copy is the only model
        from stagewise.precision import build_precision

        stage.prepare(device, build_precision(cfg.precision, device, 0), log)
    data = None
    if cfg.adapter.kind != "none" and cfg.adapter.init in ("eva", "lora-ga"):
        from stagewise.adapters import init_data

        data = init_data(stage, device)
    trainee, record = setup.build(stage, mcfg, device, checkpoint, data)
    counters = Counters(step=stage.start)
    state = TrainState(counters=counters, source=stage.source, precision=trainee.precision, rng=RNGState(),
                       stage=_StageState(stage, counters))
    if trainee.adapter is not None:
        state.register("adapter", trainee.adapter)
    guard = build_guard(cfg.spikes, trainee, state, stage.index)
    if checkpoint is not None:
        setup.restore(stage, trainee, state, checkpoint, record, device)
    if counters.step >= stage.end():
        log(f"run already complete at step {counters.step}/{stage.end()}")
        return None
    trainee.model.compile_blocks(trainee.precision.compiles(cfg.train.compile, log))          # 4. compile
    if stage.bind is not None:
        stage.bind(trainee)
    guard.take(counters.step)  # the start or the resumed checkpoint: a snapshot point of every run
    fpt = flops_per_token(mcfg, stage.flops_seq_len)
    if trainee.adapter is not None:  # the frozen base takes no weight gradients (adapters/sizes.py)
        from stagewise.adapters.sizes import adapter_flops_per_token

        fpt = adapter_flops_per_token(mcfg, cfg.adapter, stage.flops_seq_len)
    if stage.reference_forward:  # a reference forward per step: a third of the 6N + attention of training
        fpt += flops_per_token(mcfg, stage.flops_seq_len) // 3
    main = WORLD.main  # rank 0 alone writes metrics and memory.json and prints progress
    if trackers is not None:  # with rollbacks a line waits for the next snapshot: until then it can be undone
        trackers.deferred = isinstance(guard, SpikeGuard)
        guard.after_take = trackers.commit
    metrics = MetricsLog(stage.run_dir / rundir.METRICS, resume_step=counters.step if checkpoint else 0,
                         sink=trackers) if main else NullMetricsLog()
    steplog = StepLog(stage, metrics, Progress(stage.end(), counters.step, cfg.log.progress if main else "none",
                                               cfg.log.every, label=stage.name if cfg.stages else None), counters, fpt,
                      peak_flops(device, trainee.precision.gemm_dtype) * WORLD.size)
    memory = StageMemory(stage, mcfg, device, first_step=counters.step, main=main, probes=not WORLD.on)
    _loop(stage, trainee, state, steplog, device, log, memory, guard)
    memory.finish(device)
    steplog.progress.close()
    steplog.metrics.close()
    if counters.skipped_steps:
        log(f"warning: {counters.skipped_steps} step(s) skipped for non-finite gradients")
    if n := guard.rollbacks_in(stage.index):
        log(f"warning: {n} rollback(s) after loss spikes or non-finite steps (metrics.jsonl: rollback)")
    return trainee.model


def _loop(stage: Stage, trainee: setup.Trainee, state: TrainState, steplog: StepLog, device, log,
          memory: StageMemory, guard: SpikeGuard | NoGuard) -> None:
    cfg, counters = stage.cfg, state["counters"]
    kill_at, kill_signal = _kill_hook()
    sync = StepSync(WORLD, trainee.call) if WORLD.on else None

    pending = []  # an async save being written (checkpoint.async_save), published once every rank is done

    def publish(wait: bool) -> None:
        if pending and (wait or WORLD.all(pending[0].written())):
            pending.pop().wait()

    def save(at_step: int, final: bool = False) -> Path:
        steplog.flush()  # skipped_steps must count the pending step
        with stop.saving():
            publish(wait=True)  # one save in flight at a time
            background = cfg.checkpoint.async_save and not final
            started = begin_checkpoint(stage.run_dir / rundir.CHECKPOINTS, at_step, trainee.model, trainee.optimizer,
                                       state.state_dict(), cfg.checkpoint.keep_last,
                                       trainable_only=trainee.adapter is not None, background=background,
                                       process_group=WORLD.checkpoint_group)
            if not final:  # every checkpoint is a snapshot point: a resume rolls back alike
                guard.take(at_step)
            if not background:
                return started.wait()
        pending.append(started)
        return started.target

    trainee.model.train()
    with _StopRequest() as stop:
        while counters.step < stage.end():
            if stage.poll_cooldown(counters.step):
                save(counters.step)  # the trigger is now in a checkpoint: a resume cools down at the same step
                stage.consume_cooldown_file()
            t0 = time.perf_counter()
            micro, normaliser, step_tokens = _step_batches(stage, device)
            if _maybe_switch_precision(stage, trainee, state, counters.step, device, steplog.progress):
                guard.take(counters.step)  # never roll back across a change of model and optimizer
            lr = stage.lr(counters.step)
            probe = memory.probe(trainee, counters.step)
            with probe or contextlib.nullcontext():
                result = train_step(trainee.call or trainee.model, trainee.optimizer, trainee.precision,
                                    guard.objective(stage.objective), micro, lr, cfg.train.grad_clip,
                                    normaliser=normaliser, observer=probe, sync=sync)
            memory.after_step(probe, trainee, counters.step + 1, device)
            steplog.flush(t0)  # the previous step's line, now that this step is queued
            counters.step += 1
            counters.tokens_seen += step_tokens
            step = counters.step
            # stage index, realised mixture shares; loss scale, gradient/update format telemetry
            extra = {**stage.metrics(), **trainee.precision.metrics()}
            steplog.queue({"step": step, "tokens": counters.tokens_seen, "step_tokens": step_tokens, "lr": lr,
                           "mem": peak_memory_bytes(device), "extra": extra}, result, t0)
            if reason := guard.judge(steplog.host):
                _roll_back(guard, steplog, step, reason, cfg.train.grad_accum)
                continue
            evaluate_now = step == stage.end() or bool(cfg.eval.every and step % cfg.eval.every == 0)
            checkpoint_now = step == stage.end() or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            if WORLD.on and WORLD.any(stop.signum is not None) and stop.signum is None:
                stop.signum = signal.SIGTERM  # another rank was asked to stop: all save this step together
            if evaluate_now or checkpoint_now or stop.signum or step == kill_at:
                steplog.flush(evaluate=(lambda: stage.evaluate(trainee.model, trainee.precision)) if evaluate_now else None)
            publish(wait=False)
            if checkpoint_now or stop.signum:
                at = step if checkpoint_now else guard.stop_point(step, steplog.metrics)
                path = save(at, final=step == stage.end() or bool(stop.signum))
                if stop.signum:
                    what = f"saved {path}" + (f" (the snapshot of step {at}, spikes: rollback)" if at != step else "")
                    _exit_on(stop.signum, steplog, log, what, stage.run_dir)
            else:
                guard.periodic(step)
            if step == kill_at:
                os.kill(os.getpid(), kill_signal)
        steplog.flush()
        with stop.saving():
            publish(wait=True)
        if stop.signum:  # arrived after the last step's check: the final checkpoint is written; stop here
            _exit_on(stop.signum, steplog, log, "after the stage's last step; its checkpoint is complete",
                     stage.run_dir)


def _kill_hook() -> tuple[int, int]:
    """KILL_AT_STEP_ENV as (step, signal): "N" SIGKILL, "N:TERM" SIGTERM (seen at the next step's check)."""
    at, _, how = os.environ.get(KILL_AT_STEP_ENV, "-1").partition(":")
    return (int(at) if WORLD.kills_here() else -1), signal.SIGTERM if how == "TERM" else signal.SIGKILL


def _roll_back(guard: SpikeGuard, steplog: StepLog, step: int, reason: str, grad_accum: int) -> None:
    """Undo the steps since the snapshot: their metrics lines go, the next line records why."""
    loss = steplog.host().loss
    steplog.drop()
    event = {**guard.roll_back(step, reason, grad_accum), "loss": loss}
    steplog.metrics.truncate(event["to_step"])
    steplog.note = {"rollback": steplog.note.get("rollback", []) + [event], "rollbacks": len(guard.log.events)}
    steplog.progress.message(f"step {step}: {reason}; rolled back to step {event['to_step']}, "
                             f"skipping {event['skipped_batches']} batch(es)")


def _step_batches(stage: Stage, device) -> tuple[list, int, int]:
    """(this rank's micro-batches on `device`, the step's normaliser, its tokens). The micro-batches are
    drawn global (the same on every rank) and counted before each rank keeps its rows, so the
    normaliser and token count are the global ones without a collective, counted on the CPU."""
    micro = [stage.source.next() for _ in range(stage.cfg.train.grad_accum)]
    normaliser = sum(stage.objective.count(b) for b in micro)
    step_tokens = sum(b.inputs.numel() for b in micro)  # padding included; padded SFT rows vary
    return [WORLD.shard_batch(b).to(device) for b in micro], normaliser, step_tokens


def _exit_on(signum: int, steplog: StepLog, log, what: str, run_dir) -> None:
    """End the run for a stop request: logs closed, one line, exit status 128 + the signal."""
    steplog.progress.close()
    steplog.metrics.close()
    log(f"received {signal.Signals(signum).name}: {what}; continue with: stagewise resume {run_dir}")
    raise SystemExit(128 + signum)


def _maybe_switch_precision(stage: Stage, trainee, state: TrainState, step: int, device, progress) -> bool:
    """A precision schedule's switch due before this step (precision/schedule.py); whether one was."""
    if (switch := stage_due(stage.cfg.precision, step)) is None:
        return False
    trainee.model, trainee.precision, trainee.optimizer = switch_precision(
        stage.cfg.precision, switch, trainee.model, trainee.precision, trainee.optimizer,
        trainee.optimizer_factory(stage, device), device)
    state.register("precision", trainee.precision)
    trainee.model.compile_blocks(trainee.precision.compiles(stage.cfg.train.compile))
    progress.message(f"step {step}: precision {switch.mode} from here on (optimizer state: {switch.optimizer_state})")
    return True


class _StageState:
    """The stage's part of the train state: its index and whether the checkpoint is its final one."""

    def __init__(self, stage: Stage, counters: Counters):
        self.stage, self.counters = stage, counters

    def state_dict(self) -> dict:
        return {**self.stage.state_dict(self.counters.step),
                "schedule": {"name": self.stage.cfg.schedule.name, "step": self.counters.step}}

    def load_state_dict(self, state: dict) -> None:
        self.stage.load_state_dict(state)
