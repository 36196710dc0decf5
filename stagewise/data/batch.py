"""What one micro-batch carries, and the protocol every producer of batches follows.

Every stage kind feeds the same step function with `Batch`es: pre-training fills ids and
targets; SFT's packer adds positions and document ids (attention stays inside a document);
preference and RL stages add per-example weights, reference or old-policy log-probs and
advantages. Fields a stage does not use stay None and cost nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from stagewise.model.loss import IGNORE_INDEX  # target id of positions that take no loss


@dataclass
class Batch:
    inputs: torch.Tensor                           # [B, T] token ids
    targets: torch.Tensor                          # [B, T] next-token ids, IGNORE_INDEX where no loss
    positions: Optional[torch.Tensor] = None       # [B, T] RoPE positions (restart per packed document)
    doc_ids: Optional[torch.Tensor] = None         # [B, T] document of each token (block-causal attention)
    weights: Optional[torch.Tensor] = None         # [B] per-example loss weights
    ref_logprobs: Optional[torch.Tensor] = None    # reference log-probs: [S] per sequence (dpo), [N] per target (rl)
    seq_ids: Optional[torch.Tensor] = None         # [B, T] sequence of each trained target (-1: none); preferences
    labels: Optional[torch.Tensor] = None          # [U] per unit of sequences 2u, 2u+1: 1 pair/desirable, 0 not
    target_rows: Optional[torch.Tensor] = None     # [N] flat indices (into B*T) of the trained targets, from the CPU
    old_logprobs: Optional[torch.Tensor] = None    # [N] log-probs of the policy that sampled the batch, per target row
    advantages: Optional[torch.Tensor] = None      # [B] per sequence (RL)
    demo: Optional[torch.Tensor] = None            # [B] bool: rows that are demonstrations (hybrid SFT / RL)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device`. For CUDA through pinned memory with non_blocking, so the copy overlaps
        the step already queued instead of blocking the host; pinning is CUDA-only."""
        if device.type != "cuda":
            moved = {k: t.to(device) for k, t in self.tensors().items()}
        else:
            moved = {k: t.pin_memory().to(device, non_blocking=True) for k, t in self.tensors().items()}
        return Batch(**moved)

    def num_targets(self) -> int:
        """Target tokens that take a loss (a host sync if the batch is on a GPU)."""
        return int((self.targets != IGNORE_INDEX).sum())


class BatchSource(Protocol):
    """Where a stage's training batches come from: a sampler over token windows, a domain mixture,
    SFT's packer, preference pairs, RL rollouts. The loop calls next() once per micro-batch and keeps
    the source's state in every checkpoint; it never knows which kind of source it drives."""

    def next(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def metrics(self) -> dict: ...
