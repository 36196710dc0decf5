"""Everything a checkpoint holds beside the tensors, registered in one place.

Each part follows the Stateful protocol DCP uses (`state_dict()` / `load_state_dict()`):
the counters, the batch source's position, the precision state (loss scale, fp8 amax
history), every RNG, the stage's own state (cooldown trigger, completion). The model and
optimizer tensors go to DCP beside this record (checkpoint/store.py). Because the loop
keeps nothing that must survive a crash in its locals, saving, resuming and (later)
in-memory snapshots are the same operation over this registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.checkpoint import capture_rng, restore_rng
from stagewise.errors import CheckpointError


@dataclass
class Counters:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) generators; under torch.distributed every rank's, as
    {"ranks": [rank 0's, rank 1's, ...]} (a collective: every rank saves). A resume at another world
    size gives each rank the state of the rank of that number, rank 0's where the saved job had fewer."""

    def state_dict(self) -> dict:
        from stagewise.distributed import WORLD

        return {"ranks": WORLD.gather(capture_rng())} if WORLD.on else capture_rng()

    def load_state_dict(self, state: dict) -> None:
        from stagewise.distributed import WORLD

        if "ranks" in state:
            ranks = state["ranks"]
            state = ranks[WORLD.rank] if WORLD.rank < len(ranks) else ranks[0]
        restore_rng(state)


class TrainState:
    """name -> Stateful. state_dict() is the checkpoint's train_state; load_state_dict() restores the
    parts it is given and reports, in one line, a part the checkpoint lacks."""

    def __init__(self, **parts):
        self.parts = dict(parts)

    def register(self, name: str, part) -> None:
        self.parts[name] = part

    def __getitem__(self, name: str):
        return self.parts[name]

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict, names=None) -> None:
        for name in names if names is not None else self.parts:
            if name not in state:
                raise CheckpointError(f"checkpoint train_state lacks {name!r} (has {sorted(state)}); it was "
                                      "written by another stagewise version or another kind of run")
            self.parts[name].load_state_dict(state[name])
