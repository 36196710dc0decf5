"""Next-token prediction, the objective of pre-training and continual pre-training."""

from __future__ import annotations

import torch

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.model.loss import logits_cross_entropy
from stagewise.objectives.base import ObjectiveOutput, num_targets, packing_kwargs, token_model


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
    if token_model(model) is not None:
        # stagewise's Transformer fuses its output head with the fp32 loss (model/loss.py).
        loss_sum = model(batch.inputs, targets=batch.targets, **packing_kwargs(batch))
    else:  # any module mapping tokens to logits
        loss_sum = logits_cross_entropy(model(batch.inputs), batch.targets)
    return ObjectiveOutput(loss_sum, (batch.targets != IGNORE_INDEX).sum())


class CausalLM:
    """Summed next-token cross-entropy over the target tokens, normalised by their count."""

    name = "causal-lm"

    def count(self, batch: Batch) -> int:
        return num_targets(batch)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        return causal_lm_loss(model, batch)

    evaluate = __call__
