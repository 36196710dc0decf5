"""A decoder-only Llama-family transformer (pre-norm, RoPE, GQA, SwiGLU, RMSNorm).

The same network covers Mistral, Qwen2/3 and Gemma 3 through ModelConfig options whose defaults
are plain Llama: q/k/v biases (Qwen2), QK-norm (Qwen3, Gemma 3), GeGLU, (1 + w) RMSNorm, sandwich
post-norms, sqrt(d) embedding scaling, a query_pre_attn_scalar and sliding-window local layers
with their own RoPE base (Gemma 3), llama3 RoPE scaling.

Parameter names follow Meta's reference Llama code (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, ...); `stagewise.interop.hf_families` maps them to and from Hugging Face names.
RoPE (model/rope.py) uses the split-halves (`rotate_half`) pairing of HF Llama — dimension i
rotates with i + head_dim/2 — so HF checkpoints load without permuting the q/k projection rows.

Packed rows (forward/token_logprobs with positions and doc_ids) attend block-causally, within
each document only, through SDPA with a [B, 1, T, T] boolean mask; RoPE is gathered at each
token's position within its document.

Initialisation (`Transformer.init_weights`, also run by `__init__`):
  * token embeddings and every linear weight ~ N(0, init_std);
  * the two projections that write into the residual stream (attention.wo, feed_forward.w2)
    ~ N(0, init_std / sqrt(2 * n_layers)): each block adds two such outputs to the residual,
    so this keeps the residual variance at depth L independent of L (GPT-2 / Megatron-LM);
  * an untied output head ~ N(0, init_std); a tied head *is* the embedding matrix;
  * RMSNorm weights = 1 (0 with norm_unit_offset, i.e. the same unit scale); biases = 0.

Precision is not decided here: norms compute in fp32 and cast back, everything else runs in
whatever dtype the weights have or autocast chooses (stagewise.precision wraps the model).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stagewise.config.schema import ModelConfig
from stagewise.errors import ConfigError
from stagewise.model.loss import (linear_cross_entropy, linear_token_logprobs, logits_cross_entropy,
                                  logits_token_logprobs)
from stagewise.model.kv_cache import KVCache
from stagewise.model.rope import apply_rope, rope_tables


def resolved_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(n_kv_heads, head_dim, ffn_dim) with the schema's null defaults filled in."""
    n_kv = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ConfigError(f"model.n_kv_heads: expected a divisor of n_heads={cfg.n_heads}, got {n_kv}")
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.d_model: expected a multiple of n_heads={cfg.n_heads} when head_dim is null, "
                          f"got {cfg.d_model}")
    head_dim = cfg.head_dim if cfg.head_dim is not None else cfg.d_model // cfg.n_heads
    if head_dim % 2:
        raise ConfigError(f"model.head_dim: expected an even width (RoPE rotates pairs), got {head_dim}")
    # 8/3 keeps SwiGLU's three matrices at the parameter count of a 4*d GELU MLP (Shazeer 2020);
    # rounding up to 64 keeps the GEMMs tile-friendly.
    ffn = cfg.ffn_dim if cfg.ffn_dim is not None else -(-8 * cfg.d_model // (3 * 64)) * 64
    return n_kv, head_dim, ffn


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise a one-line ConfigError if `cfg` cannot build a model."""
    if not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= 0:
        raise ConfigError(f"model.vocab_size: expected a positive int (resolved from the tokenizer), "
                          f"got {cfg.vocab_size!r}")
    resolved_dims(cfg)
    if cfg.global_every and cfg.sliding_window is None:
        raise ConfigError(f"model.global_every: needs model.sliding_window (local layers), got "
                          f"global_every={cfg.global_every} with sliding_window null")


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] int64 restarting at 0 wherever doc_ids [B, T] changes along a row (each
    document's tokens contiguous). No host sync: a running maximum of the document start indices."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def is_local_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether layer i attends within the sliding window (else to the whole prefix)."""
    if cfg.sliding_window is None:
        return False
    return cfg.global_every == 0 or (i + 1) % cfg.global_every != 0


class RMSNorm(nn.Module):
    """x / rms(x) * w, or * (1 + w) with unit_offset (Gemma stores the offset-free weight)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False, feeds_matmul: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        # A norm whose output only feeds linear layers returns it in the autocast dtype: autocast
        # would round it to that dtype anyway, once per consumer (wq, wk, wv; w1, w3), keeping a
        # separate copy of each for backward. Same forward values, one copy instead of three.
        self.feeds_matmul = feeds_matmul
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.feeds_matmul and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.unit_offset, dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm saving only its input and the per-row 1/rms for backward.

    Autograd through the plain ops also keeps the fp32 normalised x (for the weight's gradient):
    one more fp32 copy of the residual stream per norm. Here backward recomputes it. The forward
    is the same arithmetic in the same order; the mean of squares runs in fp32 because over d
    terms bf16 loses too many digits.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset, out_dtype):
        f32 = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        xf = x.to(f32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        w = weight.to(f32)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return (xf * rstd * (1.0 + w if unit_offset else w)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        w = weight.to(rstd.dtype)
        grad_w = (g * n).sum(dim=tuple(range(g.ndim - 1))).to(weight.dtype)
        gn = g * (1.0 + w if ctx.unit_offset else w)
        # d/dx of x * rstd(x): rstd * (gn - n * mean(gn * n)).
        grad_x = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads, self.head_dim, _ = resolved_dims(cfg)
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        # QK-norm bounds attention logits, which otherwise can grow until softmax saturates
        # (Dehghani et al. 2023; used by OLMo2 and Qwen3).
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        # None lets SDPA use its default 1/sqrt(head_dim), bit for bit as before.
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # enable_gqa lets SDPA broadcast kv heads itself: on CPU the flash kernel then saves k/v at
        # n_kv_heads width and runs faster than materialising repeat_interleave copies.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """Gated MLP (Shazeer 2020): w2(act(w1 x) * w3 x); SwiGLU with silu, GeGLU with tanh-GELU."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.gelu = activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.w1(x), approximate="tanh") if self.gelu else F.silu(self.w1(x))
        return self.w2(gate * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = lambda **kw: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset, **kw)  # noqa: E731
        self.attention_norm = norm(feeds_matmul=True)
        self.attention = Attention(cfg)
        self.ffn_norm = norm(feeds_matmul=True)
        self.feed_forward = FeedForward(cfg.d_model, resolved_dims(cfg)[2], cfg.mlp_activation)
        # Sandwich norms (Gemma 2/3) normalise each branch's output before the residual add.
        self.post_attention_norm = norm() if cfg.post_norms else None
        self.post_ffn_norm = norm() if cfg.post_norms else None

    def forward(self, h, cos, sin, mask, cache, layer):
        a = self.attention(self.attention_norm(h), cos, sin, mask, cache, layer)
        h = h + (a if self.post_attention_norm is None else self.post_attention_norm(a))
        f = self.feed_forward(self.ffn_norm(h))
        return h + (f if self.post_ffn_norm is None else self.post_ffn_norm(f))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.n_kv_heads, self.head_dim, self.ffn_dim = resolved_dims(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset, feeds_matmul=True)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Derived from the config, so not part of the state dict (checkpoints stay portable).
        cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_base, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.local = [is_local_layer(cfg, i) for i in range(cfg.n_layers)]
        # forward(targets=...) fuses the output projection with the loss (model/loss.py); a
        # precision mode whose numerics live in the plain ops (fp16 emulation) switches it off.
        self.fused_loss = True
        self._compile = False          # compile_blocks()
        self._checkpoint_wrap = None   # checkpoint_blocks()
        self._runners: list | None = None  # what an uncached forward calls per block, when not the blocks
        if cfg.rope_local_base is not None:  # local layers rotate with their own base, unscaled (Gemma 3)
            cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_local_base)
            self.register_buffer("rope_local_cos", cos, persistent=False)
            self.register_buffer("rope_local_sin", sin, persistent=False)
        self.init_weights()

    def compile_blocks(self, enabled: bool = True) -> None:
        """torch.compile each block for uncached forwards (training, evaluation).

        Regional compilation, as torchtitan does it: the blocks share one code path, so inductor
        compiles it about once instead of tracing the whole unrolled network, and the fused loss
        (model/loss.py) stays eager. Cached decoding keeps the eager blocks: its positions change
        every call and would recompile. The compiled wrappers are not submodules, so parameter
        names and checkpoints are unchanged.
        """
        if enabled:
            import torch._inductor.config as inductor_config

            # Round fused intermediates to bf16/fp16 wherever eager would: without it inductor
            # keeps them in fp32 and bf16 losses drift from eager's by >1e-3 within 50 steps.
            inductor_config.emulate_precision_casts = True
        self._compile = enabled
        self._build_runners()

    @property
    def compiled(self) -> bool:
        return self._compile

    def checkpoint_blocks(self, wrap=None) -> None:
        """Activation checkpointing: wrap(i, block) is what an uncached forward runs for block i
        (model/checkpointing.py checkpoint_wrapper; None: the blocks themselves). Applied inside compile,
        as torchtitan orders them, so that inductor sees the recompute boundary."""
        self._checkpoint_wrap = wrap
        self._build_runners()

    def _build_runners(self) -> None:
        runners = list(self.layers)
        if self._checkpoint_wrap is not None:
            runners = [self._checkpoint_wrap(i, b) for i, b in enumerate(runners)]
        if self._compile:
            runners = [torch.compile(r) for r in runners]
        self._runners = runners if self._compile or self._checkpoint_wrap is not None else None

    def activation_sites(self) -> dict[str, nn.Module]:
        """The modules an uncached forward calls whose outputs are the activations: each block (its
        compiled or checkpointed wrapper, so that hooks stay outside the compiled code), the
        final norm (the output head's input) and the head (the logits; the fused loss never calls
        it). Code outside the model hooks them (precision telemetry, stagewise/precision/act_grads.py)."""
        blocks = self._runners if self._runners is not None else self.layers
        return {**{f"layers.{i}": b for i, b in enumerate(blocks)}, "head_input": self.norm, "logits": self.output}

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The initialisation stated in the module docstring; `generator` makes it independent
        of the global RNG, otherwise torch.manual_seed determines it."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, 0.0, std, generator=generator)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(lin.weight, 0.0, std, generator=generator)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, 0.0, out_std, generator=generator)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab_size] in the compute dtype. With a cache, the chunk
        sits at positions cache.pos .. cache.pos + T - 1 and attends to everything cached before it.

        With targets [B, T] (IGNORE_INDEX where no loss is taken) it returns instead the summed
        next-token cross-entropy, an fp32 scalar, without materialising the full logits when the
        output head is a plain linear layer (model/loss.py).

        Packed rows (several documents per row, no cache): positions [B, T] are the RoPE positions
        (each < max_seq_len), doc_ids [B, T] the document of each token, each document's tokens
        contiguous (padding may be a document of its own). A token then attends only to its own
        document's tokens up to itself, local layers within sliding_window positions of it. Either
        may be given alone: positions alone only move RoPE; doc_ids alone restart positions at 0
        in every document (document_positions)."""
        h = self._trunk(tokens, cache, positions, doc_ids)
        if targets is None:
            return self.output(h)
        return self.loss(h, targets)

    def token_logprobs(self, tokens: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                       doc_ids: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """log p(targets[b, t] | tokens[b, :t + 1]) as fp32 [B, T], 0.0 where targets is IGNORE_INDEX;
        differentiable per token (preference and policy-gradient objectives weight each one).
        Fused with the output head as forward(targets=...) is; positions/doc_ids as in forward.
        rows: flat indices into B * T of the only positions to score (the trained ones): the head then
        runs on those rows alone and the result is [1, len(rows)], in their order."""
        h = self._trunk(tokens, None, positions, doc_ids)
        if rows is not None:  # a short response under a large vocabulary: most positions need no head
            h = h.flatten(0, 1).index_select(0, rows)[None]
            targets = targets.flatten().index_select(0, rows)[None]
        dtype = self._fused_head_dtype(h)
        if dtype is not None:
            out = linear_token_logprobs(h.flatten(0, 1), self.output.weight, targets.flatten(), dtype)
            return out.view(targets.shape)
        return logits_token_logprobs(self.output(h), targets)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] of one token per row [B, 1] at cache slot cache.pos_t (a [1] tensor), with
        shapes that do not change from step to step: every slot of the cache is attended to, those
        not yet written (and each row's left padding) masked. This is what torch.compile turns into
        one graph for the whole generation (generate/engine.py, compile=True); the caller advances
        pos_t and pos. Rows' RoPE positions are slot - pad, as in the eager cached path."""
        B, S = tokens.shape[0], cache.max_len
        pos = cache.pos_t
        pad = cache.pad if cache.pad is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
        positions = (pos - pad)[:, None]                                              # [B, 1]
        j = torch.arange(S, device=tokens.device)[None, :]
        mask = ((j <= pos) & (j >= pad[:, None]))[:, None, None, :]                  # [B, 1, 1, S]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        local_mask, local_cos, local_sin = mask, cos, sin
        if any(self.local):
            local_mask = mask & (j > pos - self.cfg.sliding_window)[:, None, None, :]
        if self.cfg.rope_local_base is not None:
            local_cos, local_sin = self.rope_local_cos[positions], self.rope_local_sin[positions]
        h = self._embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, *((local_cos, local_sin, local_mask) if self.local[i] else (cos, sin, mask)), cache, i)
        return self.output(self.norm(h))[:, -1]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.cfg.scale_embeddings:
            # Gemma rounds sqrt(d) to the compute dtype before multiplying; so do we.
            h = h * torch.tensor(self.cfg.d_model ** 0.5, dtype=h.dtype, device=h.device)
        return h

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The output head's input [B, T, d] (final norm applied), for objectives that need more of the
        head's output than one token's log-prob (the full distribution: a KL to a reference model), and
        for a prompt's cached forward, whose head is needed at its last position only."""
        return self._trunk(tokens, cache, positions, doc_ids)

    def _trunk(self, tokens: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
               doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The final-norm hidden states [B, T, d] (the output head's input)."""
        packed = positions is not None or doc_ids is not None
        if packed and cache is not None:
            raise ValueError("positions/doc_ids (packed rows) cannot be combined with a KV cache")
        T = tokens.shape[1]
        start = cache.pos if cache is not None else 0
        limit = min(self.cfg.max_seq_len, cache.max_len) if cache is not None else self.cfg.max_seq_len
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {limit} "
                             f"(model.max_seq_len={self.cfg.max_seq_len})")
        inputs, local_inputs = self._attention_inputs(T, start, tokens.device)
        if cache is not None and cache.pad is not None:
            inputs, local_inputs = self._padded_attention_inputs(T, start, cache.pad)
        if packed:
            inputs, local_inputs = self._packed_attention_inputs(inputs, local_inputs, positions, doc_ids)
        h = self._embed(tokens)
        layers = self._runners if self._runners is not None and cache is None else self.layers
        for i, layer in enumerate(layers):
            h = layer(h, *(local_inputs if self.local[i] else inputs), cache, i)
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    def _attention_inputs(self, T: int, start: int, device: torch.device):
        """((cos, sin, mask) of global layers, the same of local layers) for one sequence per row at
        positions start .. start + T - 1; mask None means causal."""
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if start > 0 and T > 1:
            # Query i (absolute position start + i) sees keys 0 .. start + i: is_causal would
            # align the triangle to the top-left and hide the cached prefix.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        local_mask, local_cos, local_sin = mask, cos, sin
        window = self.cfg.sliding_window
        if any(self.local) and start + T > window:
            # Key j is visible from query position q when q - window < j <= q (HF's convention).
            q = torch.arange(start, start + T, device=device)[:, None]
            j = torch.arange(start + T, device=device)[None, :]
            local_mask = (j <= q) & (j > q - window)
        if self.cfg.rope_local_base is not None:
            local_cos, local_sin = self.rope_local_cos[start:start + T], self.rope_local_sin[start:start + T]
        return (cos, sin, mask), (local_cos, local_sin, local_mask)

    def _padded_attention_inputs(self, T: int, start: int, pad: torch.Tensor):
        """_attention_inputs' tuples for left-padded rows in a cache: slot j of row b is at RoPE
        position j - pad[b], and keys in a row's padding slots are hidden. A padding query sees
        itself only (its output is never used; a query seeing nothing would make NaNs)."""
        device = pad.device
        slots = torch.arange(start, start + T, device=device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)                     # [B, T]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        q = slots[None, :, None]                                                      # [1, T, 1]
        j = torch.arange(start + T, device=device)[None, None, :]                     # [1, 1, S]
        mask = ((j <= q) & (j >= pad[:, None, None])) | (j == q)                      # [B, T, S]
        local_mask = mask
        if any(self.local):
            local_mask = mask & (j > q - self.cfg.sliding_window)
        local_cos, local_sin = cos, sin
        if self.cfg.rope_local_base is not None:
            local_cos, local_sin = self.rope_local_cos[positions], self.rope_local_sin[positions]
        return (cos, sin, mask.unsqueeze(1)), (local_cos, local_sin, local_mask.unsqueeze(1))

    def _packed_attention_inputs(self, inputs, local_inputs, positions, doc_ids):
        """_attention_inputs' tuples with RoPE gathered at positions [B, T] and, given doc_ids, a
        block-causal [B, 1, T, T] mask. SDPA with a boolean mask, not flex_attention: torch 2.13
        has no flex_attention backward on CPU (bench/packed_attention.py)."""
        if positions is None:
            positions = document_positions(doc_ids)
        mask, local_mask = inputs[2], local_inputs[2]  # positions alone keep one sequence's masks
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        local_cos, local_sin = cos, sin
        if self.cfg.rope_local_base is not None:
            local_cos, local_sin = self.rope_local_cos[positions], self.rope_local_sin[positions]
        if doc_ids is not None:
            T = doc_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
            mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)
            local_mask = mask
            if any(self.local):  # the window counts positions within the document (HF's q - window < j)
                distance = positions[:, None, :, None] - positions[:, None, None, :]
                local_mask = mask & (distance < self.cfg.sliding_window)
        return (cos, sin, mask), (local_cos, local_sin, local_mask)

    def _fused_head_dtype(self, h: torch.Tensor) -> torch.dtype | None:
        """The compute dtype in which to fuse the output head with its loss (model/loss.py), or None
        where the head's plain ops must run: a head that is not a bias-free nn.Linear (adapters),
        fp16 (whose numerics live in the plain ops), or fused_loss switched off."""
        dtype = self.output.weight.dtype
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
        if self.fused_loss and type(self.output) is nn.Linear and self.output.bias is None \
                and dtype != torch.float16:
            return dtype
        return None

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the output head on final hidden states h [B, T, d]."""
        dtype = self._fused_head_dtype(h)
        if dtype is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), dtype)
        return logits_cross_entropy(self.output(h), targets)
