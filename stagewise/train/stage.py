"""One stage as the loop drives it, whatever its kind.

A stage kind (train/kinds.py: `lm`, `sft`, `dpo`, `rl`) assembles a `Stage` from the
recipe: its batch source, its objective, its evaluation, its LR schedule over its own steps and
what it starts from. The loop (train/loop.py) only calls the methods below, so adding a kind
never adds a branch there. Steps are numbered globally across stages: stage i runs from its
`start` to `end()`, and metrics.jsonl holds one continuous curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from stagewise.config.schema import RunConfig
from stagewise.data.batch import BatchSource
from stagewise.errors import CheckpointError
from stagewise.objectives import Objective
from stagewise.optim import lr_at

COOLDOWN_FILE = "COOLDOWN"


@dataclass
class Stage:
    index: int
    name: str
    kind: str
    cfg: RunConfig                 # the recipe as the loop sees it during this stage
    start: int                     # global step the stage starts at
    budget: int                    # the stage's own steps (before a triggered cooldown shortens it)
    source: BatchSource
    objective: Objective
    evaluate: Callable             # (model, precision) -> {metric name: value}
    run_dir: Path
    flops_seq_len: int             # sequence length the FLOPs per token are counted at
    init_from: Optional[str] = None    # weights loaded when the stage begins
    base: object = None                # what an adapter stage's base is (train.stages.base_source)
    keep_optimizer: bool = True        # AdamW moments carried over from the previous stage
    cooldown_at: Optional[int] = None  # stage-local step at which an infinite schedule cools down
    triggerable: bool = False          # RUN_DIR/COOLDOWN may trigger that cooldown
    report_index: bool = False         # metrics carry "stage": index (staged recipes)
    extra_metrics: Callable = dict     # () -> metrics of the stage beside the source's
    prepare: Optional[Callable] = None  # (device, precision, log) before the model is built, on every start and
    #                                     resume: what the stage needs first (dpo: its reference)
    reference_forward: bool = False    # every step also runs a reference forward (counted in MFU)
    bind: Optional[Callable] = None    # (trainee) once the model is built and restored: a source that generates
    #                                    with the policy (rl rollouts) reads trainee.model from then on

    def end(self) -> int:
        """Global step at which the stage ends: its budget, or the end of a triggered cooldown."""
        local, sched = self.budget, self.cfg.schedule
        if self.cooldown_at is not None:
            local = min(local, max(self.cooldown_at, sched.warmup_steps) + sched.cooldown_steps)
        return self.start + local

    def lr(self, step: int) -> float:
        sched, local = self.cfg.schedule, step - self.start
        start = None
        if sched.name == "infinite" and self.cooldown_at is not None:
            start = max(self.cooldown_at, sched.warmup_steps)
        return lr_at(local, self.cfg.optim.lr, self.budget, sched, cooldown_start=start)

    def poll_cooldown(self, step: int) -> bool:
        """True when RUN_DIR/COOLDOWN has just triggered the cooldown of an infinite schedule."""
        if not self.triggerable or self.cooldown_at is not None or not (self.run_dir / COOLDOWN_FILE).exists():
            return False
        self.cooldown_at = step - self.start
        return True

    def consume_cooldown_file(self) -> None:
        (self.run_dir / COOLDOWN_FILE).unlink(missing_ok=True)

    def metrics(self) -> dict:
        out = {"stage": self.index} if self.report_index else {}
        return {**out, **self.source.metrics(), **self.extra_metrics()}

    def state_dict(self, at_step: int) -> dict:
        return {"index": self.index, "name": self.name, "kind": self.kind, "start": self.start,
                "cooldown_at": self.cooldown_at, "complete": at_step == self.end()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("index") != self.index:
            raise CheckpointError(f"checkpoint belongs to stage {state.get('index')}, not stage {self.index}")
        self.cooldown_at = state.get("cooldown_at")

    def begins_at(self, train_state: dict) -> bool:
        """Whether a checkpoint's train_state is the previous stage's final one (this stage's start)."""
        prev = train_state.get("stage") or {}
        return self.index > 0 and prev.get("index") == self.index - 1 and bool(prev.get("complete"))
