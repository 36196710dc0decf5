"""Autoregressive sampling with a KV cache: one forward over the prompt, then one token per step."""

from __future__ import annotations

from typing import Collection

import torch

from stagewise.model.llama import Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus, over the last dim.

    top_k=0 and top_p=1.0 disable each filter. top-k keeps ties with the k-th value. The nucleus
    (Holtzman et al. 2019) is the smallest set of most likely tokens whose probability reaches
    top_p; it is taken after top-k, over the renormalised survivors (the order HF uses).
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"filter_logits: expected top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A token survives if the tokens ranked above it have not yet reached top_p, so the most
        # likely token always survives.
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | Collection[int] | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue `prompt_ids`; returns only the new tokens (without the eos token, if one is sampled).
    One row of the batched engine (generate/engine.py), which every caller shares.

    `eos_id` may be several ids (a tokenizer's `stop_ids`: Gemma's instruction models end a turn
    with `<end_of_turn>`, not `<eos>`); generation stops at the first of them.

    temperature 0 is greedy decoding. Prompt and continuation must fit in model.cfg.max_seq_len
    positions, so a longer prompt keeps its last max_seq_len - max_new_tokens tokens (at least
    one), and generation stops early when the window is full. The model's train/eval mode is left
    as it is (the model has no dropout).
    """
    from stagewise.generate.engine import generate_batch

    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; expected at least one token id")
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop_ids=stop, generator=generator).tokens[0]
