"""The one training step every stage uses.

Pre-training, continual pre-training, SFT, preference optimisation and RL differ in the
objective (objectives/base.py: a loss sum, its normaliser, its metrics) and in the batches
they feed; the step itself — accumulation, precision hooks, clipping, the optimizer update —
is this function and nothing else.
"""

from __future__ import annotations

import contextlib
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
               grad_clip: float, normaliser: int | None = None, observer=None, sync=None) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation).

    normaliser: what the summed loss is divided by; by default the objective's count of the
    micro-batches (a bare function counts target tokens) — a host sync if they are on a GPU,
    so the loop counts on the CPU batches and passes it. The step itself does not wait for the
    device (docs/guide.md says which precision modes still do). observer: told when each forward,
    each micro-batch's backward and the whole backward are done (the memory probe, stagewise/memory/measure.py); it changes nothing.
    sync: under torch.distributed (distributed.StepSync) the micro-batches are this rank's rows of
    global ones and `normaliser` their global count; gradients synchronise on the last micro-batch,
    and the loss and metric sums are added over ranks in one all-reduce.
    """
    count = getattr(objective, "count", num_targets)
    total = normaliser or sum(count(mb) for mb in micro_batches)
    assert total > 0, "a step needs a positive normaliser (at least one target)"
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)

    scale = sync.scale if sync is not None else 1.0
    loss_sum, metric_sums, metric_counts = None, {}, {}
    for i, mb in enumerate(micro_batches):
        with sync.micro(last=i == len(micro_batches) - 1) if sync is not None else contextlib.nullcontext():
            with precision.autocast():
                out = objective(model, mb)
            if observer is not None:
                observer.forward_done()
            precision.backward(out.loss_sum * scale / total if scale != 1.0 else out.loss_sum / total)
        if observer is not None:
            observer.micro_done()
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
    if sync is not None:
        loss_sum, metric_sums, metric_counts = _reduce(sync, loss_sum, metric_sums, metric_counts)
    precision.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm=inf measures the norm without clipping, so grad_norm is always reported.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP2): the norm of the whole gradient
        grad_norm = grad_norm.full_tensor()
    applied = precision.step(optimizer, grad_norm)
    metrics = {n: v.double() / (metric_counts[n].double().clamp(min=1) if n in metric_counts else total)
               for n, v in metric_sums.items()}
    return StepResult(loss_sum.double() / total, grad_norm, total, applied, metrics)


def _reduce(sync, loss_sum, sums: dict, counts: dict):
    """The step's loss sum and the objective's metric sums and counts, added over ranks (one all-reduce;
    every rank computes the same metrics, so the dict order agrees)."""
    names, cnames = list(sums), list(counts)
    flat = sync.all_reduce_sum(torch.stack([loss_sum, *(sums[n] for n in names), *(counts[n] for n in cnames)]))
    return flat[0], dict(zip(names, flat[1:1 + len(names)])), dict(zip(cnames, flat[1 + len(names):]))
