"""The one training step every stage uses.

Pre-training, continual pre-training, SFT, preference optimisation and RL differ in the
objective (a function of model and batch returning a loss sum and a target count) and in
the batches they feed; the step itself — accumulation, precision hooks, clipping, the
optimizer update — is this function and nothing else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from stagewise.objectives import Batch, ObjectiveOutput, num_targets
from stagewise.precision import Precision

Objective = Callable[[torch.nn.Module, Batch], ObjectiveOutput]


class StepResult(NamedTuple):
    """What a step measured, left on the device so that returning it does not wait for the step.

    loss is fp64, not fp32, so that host() gives exactly float(fp32 loss sum) / count, the value
    metrics.jsonl has always recorded.
    """

    loss: torch.Tensor       # 0-d fp64: mean loss per target token over the whole step
    grad_norm: torch.Tensor  # 0-d: global L2 norm of the unscaled gradient, before clipping
    num_targets: int
    applied: torch.Tensor    # 0-d bool: False when the precision hook skipped a non-finite step

    def host(self) -> "StepResult":
        """The same result as Python floats and a bool: one read-back, which waits for the step."""
        loss, norm, applied = torch.stack([self.loss.double(), self.grad_norm.double(),
                                           self.applied.double()]).tolist()
        return StepResult(loss, norm, self.num_targets, bool(applied))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a CPU batch to `device`. For CUDA through pinned memory with non_blocking, so the copy
    overlaps the step already queued instead of blocking the host; pinning is CUDA-only."""
    if device.type != "cuda":
        return Batch(*(t.to(device) for t in batch))
    return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in batch))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               objective: Objective, micro_batches: Sequence[Batch], lr: float,
               grad_clip: float, targets_per_step: int | None = None) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    targets_per_step: the normaliser of the summed loss; by default the number of target tokens
    in micro_batches, counted before the forward passes — a host sync if they are on a GPU, so
    the trainer counts on the CPU batches and passes it. The step itself does not wait for the
    device (docs/guide.md says which precision modes still do).
    """
    total = targets_per_step or sum(num_targets(mb) for mb in micro_batches)
    assert total > 0, "a step needs at least one target token"
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)

    loss_sum = None
    for mb in micro_batches:
        with precision.autocast():
            out = objective(model, mb)
        precision.backward(out.loss_sum / total)
        part = out.loss_sum.detach().float()
        loss_sum = part if loss_sum is None else loss_sum + part

    precision.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm=inf measures the norm without clipping, so grad_norm is always reported.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    applied = precision.step(optimizer, grad_norm)
    return StepResult(loss_sum.double() / total, grad_norm, total, applied)
