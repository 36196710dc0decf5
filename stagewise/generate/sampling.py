"""Autoregressive sampling with a KV cache: one forward over the prompt, then one token per step."""

from __future__ import annotations

from typing import Collection

import torch

from stagewise.model.llama import KVCache, Transformer


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


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | Collection[int] | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue `prompt_ids`; returns only the new tokens (without the eos token, if one is sampled).

    `eos_id` may be several ids (a tokenizer's `stop_ids`: Gemma's instruction models end a turn
    with `<end_of_turn>`, not `<eos>`); generation stops at the first of them.

    temperature 0 is greedy decoding. Prompt and continuation must fit in model.cfg.max_seq_len
    positions, so a longer prompt keeps its last max_seq_len - max_new_tokens tokens (at least
    one), and generation stops early when the window is full. The model's train/eval mode is left
    as it is (the model has no dropout).
    """
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; expected at least one token id")
    max_len = model.cfg.max_seq_len
    if max_new_tokens <= 0:
        return []
    prompt = prompt_ids[-max(1, max_len - max_new_tokens):]
    device = model.tok_embeddings.weight.device
    # Only the positions this call can reach: a 32k-context model need not allocate a 32k cache.
    cache = KVCache.for_model(model, batch_size=1, max_len=min(max_len, len(prompt) + max_new_tokens))
    logits = model(torch.tensor([prompt], dtype=torch.long, device=device), cache=cache)[0, -1]
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    new: list[int] = []
    while True:
        if temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            filtered = filter_logits(logits.float() / temperature, top_k, top_p)
            token = int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))
        if token in stop:
            break
        new.append(token)
        if len(new) == max_new_tokens or cache.pos == cache.max_len:
            break
        logits = model(torch.tensor([[token]], dtype=torch.long, device=device), cache=cache)[0, -1]
    return new
