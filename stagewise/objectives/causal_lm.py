"""Next-token prediction, the objective of pre-training and continual pre-training.

Objectives return the *sum* of per-token losses and the number of target tokens, never a
mean: the step function divides by the token count of the whole accumulated batch, so a
step's gradient is the same whether it comes in one micro-batch or many, even when
micro-batches hold different numbers of targets (masked SFT prompts, packed documents).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stagewise.model.loss import IGNORE_INDEX, logits_cross_entropy


class Batch(NamedTuple):
    inputs: torch.Tensor   # [B, T] token ids
    targets: torch.Tensor  # [B, T] next-token ids, IGNORE_INDEX where no loss is taken


class ObjectiveOutput(NamedTuple):
    loss_sum: torch.Tensor  # scalar, fp32, summed over counted targets
    num_targets: torch.Tensor  # 0-d int64 on the batch's device: counting does not wait for it


def num_targets(batch: Batch) -> int:
    return int((batch.targets != IGNORE_INDEX).sum())


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
    if _computes_own_loss(model):
        # stagewise's Transformer fuses its output head with the fp32 loss (model/loss.py).
        loss_sum = model(batch.inputs, targets=batch.targets)
    else:  # any module mapping tokens to logits
        loss_sum = logits_cross_entropy(model(batch.inputs), batch.targets)
    return ObjectiveOutput(loss_sum, (batch.targets != IGNORE_INDEX).sum())


def _computes_own_loss(model: torch.nn.Module) -> bool:
    from stagewise.model import Transformer

    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return isinstance(getattr(inner, "module", inner), Transformer)  # DDP's wrapper


OBJECTIVES = {"causal-lm": causal_lm_loss}
