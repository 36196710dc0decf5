"""What an objective is: a callable giving a loss *sum*, its normaliser and its own metrics.

Objectives return sums, never means: the step divides by the normaliser of the whole
accumulated step (target tokens, sequences or pairs, as the objective counts them), so a
step's gradient is the same whether it comes in one micro-batch or many, even when
micro-batches hold different numbers of targets (masked SFT prompts, packed documents).
`count(batch)` gives that normaliser from the CPU batch, before the forward pass, so the
step never has to wait for the device to learn it.

Metrics are sums too (e.g. of per-token probabilities); the step divides them by the same
normaliser, or by their own summed count where the objective gives one (a mean over a subset of
the units), and metrics.jsonl records them under the objective's own names.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from stagewise.data.batch import IGNORE_INDEX, Batch


class ObjectiveOutput(NamedTuple):
    loss_sum: torch.Tensor    # scalar fp32, summed over what the objective counts
    normaliser: torch.Tensor  # 0-d int64 on the batch's device: counting does not wait for it
    metrics: dict = {}        # name -> 0-d tensor, a sum over the same units as loss_sum
    counts: dict = {}         # name -> 0-d tensor: that metric is a sum over these items instead (a mean
    #                           over a subset, e.g. kto's desirable examples); 0 when a step has none


class Objective(Protocol):
    name: str

    def count(self, batch: Batch) -> int:
        """The normaliser this batch contributes, from the CPU batch."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput: ...

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        """The validation loss: the training loss unless the objective reweights it (e.g. DFT),
        in which case the plain cross-entropy, so that validation losses stay comparable."""


def num_targets(batch: Batch) -> int:
    return int((batch.targets != IGNORE_INDEX).sum())


def token_model(model: torch.nn.Module):
    """stagewise's Transformer behind torch.compile / DDP wrappers, or None for any other module."""
    from stagewise.model import Transformer

    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return inner if isinstance(inner, Transformer) else None


def packing_kwargs(batch: Batch) -> dict:
    """positions and doc_ids for the model's forward, only when the batch is packed."""
    return {k: v for k, v in (("positions", batch.positions), ("doc_ids", batch.doc_ids)) if v is not None}
