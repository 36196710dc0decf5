"""Batched generation: many prompts at once, one KV cache, sampling on the device.

Prompts of different lengths are right-aligned in one [B, P] batch (left padding): the cache
records each row's padding (KVCache.pad), so row b's token in slot j sits at RoPE position
j - pad[b] and no query attends to padding. One forward fills the cache with every prompt; each
further step feeds one token per row. The sampled tokens, the stop test and the finished flags
stay on the device; the host looks at them only every `sync_every` tokens, to end early when all
rows have stopped and (eager decoding) to drop finished rows from the batch and the cache (a long
tail of one slow row then costs one row's compute, not B rows'). Only the prompt's last position
goes through the output head.

Stopping: a row ends at the first of `stop_ids` (the chat template's end-of-turn tokens and eos);
that token is not part of `tokens` but is reported in `stop_token`. Otherwise a row ends after
max_new_tokens, or when the model's max_seq_len is full. A prompt longer than
max_seq_len - max_new_tokens keeps its last tokens (at least one), as `generate` always has.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k and the
nucleus top-p (filter_logits), then one draw from `generator` per row and step. Given the same
generator state, model and prompts, the draws are the same on every run (RL resume rests on it).
Entropy, when asked for, is that of softmax(logits / temperature) before top-k/top-p (at
temperature 1 for greedy decoding), averaged over the generated tokens (stop tokens included).

Decoding steps run the cached forward eagerly, or (compile=True) through torch.compile of
Transformer.decode_step, whose shapes do not change from step to step (the whole cache attended,
masked), so one graph serves every step.

The model runs in whatever mode and numeric context the caller sets: wrap calls in
`precision.inference()` so that rollouts and evaluation leave precision state untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from stagewise.generate.sampling import filter_logits
from stagewise.model.kv_cache import KVCache


@dataclass
class Generation:
    tokens: list[list[int]]            # new tokens per prompt, stop token excluded
    stop_token: list[int | None]       # the stop id a row ended on, None when it ran out of length
    entropy: float = float("nan")      # mean per-token entropy (nats), when asked for
    seconds: float = 0.0               # wall time of the call
    steps: int = 0                     # decode steps run (forward passes after the prompt's)
    rows_per_step: list[int] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        """Tokens generated, stop tokens included."""
        return sum(len(t) for t in self.tokens) + sum(s is not None for s in self.stop_token)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(1)


def _entropies(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] entropy (nats) of softmax(logits / temperature) per row; temperature 0 counts as 1."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def _compiled_decode(model, backend: str):
    """model.decode_step under torch.compile, kept on the model (one compilation per model and backend)."""
    cache = model.__dict__.setdefault("_compiled_decode_steps", {})
    if backend not in cache:
        cache[backend] = torch.compile(model.decode_step, backend=backend, dynamic=False)
    return cache[backend]


@torch.inference_mode()
def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, stop_ids: Collection[int] = (),
                   generator: torch.Generator | None = None, entropy: bool = False,
                   sync_every: int = 8, compile: bool | str = False) -> Generation:
    """Continue every prompt (lists of token ids, each non-empty); see the module docstring.
    compile: decode with torch.compile'd Transformer.decode_step (static shapes: every step attends
    to the whole cache, masked), compiled once per model and batch size; finished rows then stay in
    the batch (dropping them would change the shape and recompile). A string names the
    torch.compile backend (True: inductor). The prompt's forward stays eager."""
    t0 = time.perf_counter()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: an empty prompt; expected at least one token id per prompt")
    if temperature < 0 or temperature != temperature:
        raise ValueError(f"generate_batch: temperature must be >= 0, got {temperature}")
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return Generation([[] for _ in prompts], [None] * B, seconds=time.perf_counter() - t0)
    max_len = model.cfg.max_seq_len
    keep = max(1, max_len - max_new_tokens)
    prompts = [list(p)[-keep:] for p in prompts]
    P = max(len(p) for p in prompts)
    device = model.tok_embeddings.weight.device
    ids = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in prompts], dtype=torch.long, device=device)
    cache = KVCache.for_model(model, batch_size=B, max_len=min(max_len, P + max_new_tokens))
    cache.pad = pad if bool((pad > 0).any()) else None  # no padding: the plain causal path, bit for bit
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    budget = min(max_new_tokens, cache.max_len - P + 1)  # the last token needs no further forward

    out = torch.zeros(B, budget, dtype=torch.long, device=device)   # [B, budget], row order of prompts
    rows = torch.arange(B, device=device)                          # original index of each live row
    done = torch.zeros(B, dtype=torch.bool, device=device)         # of the live rows
    length = torch.zeros(B, dtype=torch.long, device=device)       # tokens before the stop, per prompt
    stopped_at = torch.full((B,), -1, dtype=torch.long, device=device)
    ent = torch.zeros((), dtype=torch.float64, device=device)
    ent_n = torch.zeros((), dtype=torch.long, device=device)
    # The prompt fills the cache; only its last position needs the output head (a 262k-token head over
    # every prompt position was most of a Gemma call).
    logits = model.output(model.hidden_states(ids.to(device), cache=cache)[:, -1])
    step_fn = None
    if compile:
        step_fn = _compiled_decode(model, "inductor" if compile is True else compile)
        cache.pos_t = torch.tensor([cache.pos], dtype=torch.long, device=device)
    steps, live_counts = 0, []
    for t in range(budget):
        live_counts.append(rows.numel())
        token = _pick(logits, temperature, top_k, top_p, generator)
        if entropy:
            ent += (_entropies(logits, temperature) * ~done).sum().double()
            ent_n += (~done).sum()
        is_stop = torch.isin(token, stops) & ~done
        out[rows, t] = token
        stopped_at[rows] = torch.where(is_stop, token, stopped_at[rows])
        done = done | is_stop
        length[rows] += (~done).long()
        if t == budget - 1:
            break
        if (t + 1) % sync_every == 0:
            live = ~done
            n_live = int(live.sum())          # the host sync, once per sync_every tokens
            if n_live == 0:
                break
            if n_live < rows.numel() and step_fn is None:  # compiled: the batch keeps its shape (one graph)
                keep_rows = live.nonzero().squeeze(1)
                rows, done, token, logits = rows[keep_rows], done[keep_rows], token[keep_rows], logits[keep_rows]
                cache.select(keep_rows)
        if step_fn is None:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:
            logits = step_fn(token[:, None], cache)
            cache.pos_t += 1
            cache.pos += 1
        steps += 1
    out, length, stopped_at = out.cpu(), length.cpu().tolist(), stopped_at.cpu().tolist()
    tokens = [out[b, :length[b]].tolist() for b in range(B)]
    stop_token = [s if s >= 0 else None for s in stopped_at]
    mean_entropy = float(ent / ent_n) if entropy and int(ent_n) else float("nan")
    return Generation(tokens, stop_token, mean_entropy, time.perf_counter() - t0, steps, live_counts)
