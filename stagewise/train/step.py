"""The one training step every stage uses.

Pre-training, continual pre-training, SFT, preference optimisation and RL differ in the
objective (objectives/base.py: a loss sum, its normaliser, its metrics) and in the batches
they feed; the step itself — accumulation, precision hooks, clipping, the optimizer update —
is this function and nothing else.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from stagewise.data.batch import Batch
from stagewise.objectives.base import Objective, num_targets
from stagewise.precision import Precision


class StepResult(NamedTuple):
    """What a step measured, left on the device so that returning it does not wait for the step.

    loss is fp64, not fp32, so that host() gives exactly float(fp32 loss sum) / count, the value
    metrics.jsonl has always recorded.
    """

    loss: torch.Tensor       # 0-d fp64: the step's loss sum over its normaliser
    grad_norm: torch.Tensor  # 0-d: global L2 norm of the unscaled gradient, before clipping
    num_targets: int         # the normaliser (target tokens, sequences or pairs, as the objective counts)
    applied: torch.Tensor    # 0-d bool: False when the precision hook skipped a non-finite step
    metrics: dict = {}       # the objective's metrics, each its sum over the step / the normaliser

    def host(self) -> "StepResult":
        """The same result as Python floats and a bool: one read-back, which waits for the step."""
        names = list(self.metrics)
        values = torch.stack([self.loss.double(), self.grad_norm.double(), self.applied.double(),
                              *(self.metrics[n].double() for n in names)]).tolist()
        loss, norm, applied, *rest = values
        return StepResult(loss, norm, self.num_targets, bool(applied), dict(zip(names, rest)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               objective: Objective, micro_batches: Sequence[Batch], lr: float,
               grad_clip: float, normaliser: int | None = None, observer=None) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    normaliser: what the summed loss is divided by; by default the objective's count of the
    micro-batches (a bare function counts target tokens) — a host sync if they are on a GPU,
    so the loop counts on the CPU batches and passes it. The step itself does not wait for the
    device (docs/guide.md says which precision modes still do). observer: told when each forward
    and the backward are done (the memory probe, stagewise/memory/measure.py); it changes nothing.
    """
    count = getattr(objective, "count", num_targets)
    total = normaliser or sum(count(mb) for mb in micro_batches)
    assert total > 0, "a step needs a positive normaliser (at least one target)"
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)

    loss_sum, metric_sums, metric_counts = None, {}, {}
    for mb in micro_batches:
        with precision.autocast():
            out = objective(model, mb)
        if observer is not None:
            observer.forward_done()
        precision.backward(out.loss_sum / total)
        part = out.loss_sum.detach().float()
        loss_sum = part if loss_sum is None else loss_sum + part
        for name, value in out.metrics.items():
            value = value.detach().float()
            metric_sums[name] = value if name not in metric_sums else metric_sums[name] + value
        for name, value in out.counts.items():
            value = value.detach().float()
            metric_counts[name] = value if name not in metric_counts else metric_counts[name] + value

    if observer is not None:
        observer.backward_done()
    precision.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm=inf measures the norm without clipping, so grad_norm is always reported.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    applied = precision.step(optimizer, grad_norm)
    metrics = {n: v.double() / (metric_counts[n].double().clamp(min=1) if n in metric_counts else total)
               for n, v in metric_sums.items()}
    return StepResult(loss_sum.double() / total, grad_norm, total, applied, metrics)
