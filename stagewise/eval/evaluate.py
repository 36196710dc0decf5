"""Validation loss and perplexity.

Loss is the mean next-token cross-entropy (nats) over every target token of the given
batches; perplexity is exp(loss). The same objective function as training computes it,
so training and evaluation losses are the same quantity.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from stagewise.objectives import Batch, causal_lm_loss
from stagewise.precision import Precision


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision | None = None,
             device: torch.device | None = None) -> dict:
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        if device is not None:
            batch = Batch(batch.inputs.to(device), batch.targets.to(device))
        ctx = precision.autocast() if precision is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = causal_lm_loss(model, batch)
        loss_sum += float(out.loss_sum)
        count += int(out.num_targets)
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
