"""Validation loss, perplexity and bits per byte.

Loss is the stage objective's validation loss summed over the given batches and divided by
its normaliser; for pre-training and SFT that is the mean next-token cross-entropy (nats)
over every target token (SFT: the assistant tokens). Perplexity is exp(loss). The same
objective as training computes it, so training and evaluation losses are the same quantity
(objectives that reweight tokens, such as DFT, evaluate the plain cross-entropy).

Bits per byte is the tokenizer-independent form of the same loss:

    bits_per_byte = sum of target-token losses (nats) / (ln 2 * UTF-8 bytes of those target tokens)

i.e. the code length, in bits, an arithmetic coder driven by the model would need per byte of
the evaluated text. A tokenizer with longer tokens has a higher per-token loss for the same
model quality, so per-token losses of runs with different tokenizers cannot be compared;
bits per byte can. Special tokens (the document separator) stand for no text: they add
their loss to the numerator and no bytes to the denominator.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import torch

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.objectives import CausalLM, Objective
from stagewise.precision import Precision


def target_bytes(targets: torch.Tensor, token_bytes: np.ndarray) -> int:
    """UTF-8 bytes of text the counted targets of a batch stand for (IGNORE_INDEX counts nothing)."""
    t = targets.detach().cpu().numpy().reshape(-1)
    return int(token_bytes[t[t != IGNORE_INDEX]].sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision | None = None,
             device: torch.device | None = None, token_bytes: Optional[np.ndarray] = None,
             objective: Objective | None = None) -> dict:
    """{loss, perplexity, tokens} and, given the tokenizer's token_bytes, {bytes, bits_per_byte};
    objective: the stage's (default next-token prediction). tokens is the summed normaliser."""
    objective = objective or CausalLM()
    was_training = model.training
    model.eval()
    loss_sum, count, nbytes = 0.0, 0, 0
    for batch in batches:
        if token_bytes is not None:
            nbytes += target_bytes(batch.targets, token_bytes)
        if device is not None:
            batch = batch.to(device)
        ctx = precision.inference() if precision is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = objective.evaluate(model, batch)
        loss_sum += float(out.loss_sum)
        count += int(out.normaliser)
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if token_bytes is not None:
        res["bytes"] = nbytes
        res["bits_per_byte"] = loss_sum / (math.log(2) * nbytes) if nbytes else float("nan")
    return res
