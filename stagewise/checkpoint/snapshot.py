"""In-memory snapshots of the full training state: a checkpoint that never touches the disk.

A snapshot holds exactly what a checkpoint would (store.begin_checkpoint): the model's (or, for an
adapter run, the trainable) tensors, the optimizer state tensors and its record, and the caller's
train_state, with every tensor copied to CPU memory. Restoring goes through the same code as
loading a checkpoint (store.load_targets / apply_loaded), only filled from memory instead of by
DCP, so a restored snapshot is the saved state bit for bit. The loss-spike guard rolls back to one
(train/spikes.py), the way the in-memory checkpoints of Gemini (Wang et al., SOSP 2023) restore
from host memory instead of storage.

Under torch.distributed each rank keeps its own local shards (a DTensor's to_local()); a snapshot
is restored by the same ranks in the same layout, never resharded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from stagewise.checkpoint.store import OPTIM_PREFIX, _model_tensors, _optimizer_record, apply_loaded, load_targets


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Snapshot:
    step: int
    tensors: dict          # flat checkpoint keys -> CPU copies of this rank's local tensors
    optimizer: dict | None  # the optimizer record a checkpoint's train_state.json would hold
    train_state: dict
    trainable_only: bool


def take_snapshot(step: int, model: nn.Module, optimizer, train_state: dict, trainable_only: bool) -> Snapshot:
    """Copy the state a checkpoint of `step` would hold into CPU memory."""
    tensors = _model_tensors(model, trainable_only)
    record = None
    if optimizer is not None:
        record, optim_tensors = _optimizer_record(model, optimizer)
        tensors.update(optim_tensors)
    cpu = {k: _local(v).detach().to("cpu", copy=True) for k, v in tensors.items()}
    return Snapshot(step, cpu, copy.deepcopy(record), copy.deepcopy(train_state), trainable_only)


def restore_snapshot(snapshot: Snapshot, model: nn.Module, optimizer) -> dict:
    """Put `snapshot` back into `model` and `optimizer` in place; returns its train_state with "step"."""
    has_optim = any(k.startswith(OPTIM_PREFIX) for k in snapshot.tensors)
    target, loaded = load_targets(model, optimizer, snapshot.trainable_only, has_optim)
    assert sorted(target) == sorted(snapshot.tensors), "a snapshot is restored into the model it was taken of"
    with torch.no_grad():
        for key, t in target.items():
            _local(t).copy_(snapshot.tensors[key])
    apply_loaded(model, optimizer, loaded, snapshot.optimizer, snapshot.trainable_only)
    return {**copy.deepcopy(snapshot.train_state), "step": snapshot.step}
