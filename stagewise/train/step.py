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
    loss: float          # mean loss per target token over the whole step
    grad_norm: float     # global L2 norm of the unscaled gradient, before clipping
    num_targets: int
    applied: bool        # False when the precision hook skipped a non-finite step


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               objective: Objective, micro_batches: Sequence[Batch], lr: float,
               grad_clip: float, targets_per_step: int | None = None) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    targets_per_step: the normaliser of the summed loss; by default the number of
    target tokens in micro_batches, counted before the forward passes.
    """
    total = targets_per_step or sum(num_targets(mb) for mb in micro_batches)
    assert total > 0, "a step needs at least one target token"
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)

    loss_sum = torch.zeros((), dtype=torch.float32)
    for mb in micro_batches:
        with precision.autocast():
            out = objective(model, mb)
        precision.backward(out.loss_sum / total)
        loss_sum += out.loss_sum.detach().float().cpu()

    precision.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm=inf measures the norm without clipping, so grad_norm is always reported.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    applied = precision.step(optimizer, grad_norm)
    return StepResult(float(loss_sum) / total, float(grad_norm), total, applied)
