"""Parameter, FLOP and memory arithmetic for `stagewise.model.llama` (no modules are built).

FLOPs follow the PaLM paper, appendix B (Chowdhery et al. 2022), as nanochat does: a token costs
2 FLOPs per matmul parameter in the forward pass and 4 in the backward (gradients for both the
input and the weight), hence 6 * N_matmul; attention adds 2 * 2 * T * H * head_dim forward FLOPs
per layer and token (QK^T and attention-weighted V), times 3 for forward + backward, i.e.
12 * L * H * head_dim * T. The full T x T score matrix is counted even though causal kernels skip
half of it, so model FLOPs utilisation stays comparable with published numbers.
"""

from __future__ import annotations

from stagewise.config.schema import ModelConfig
from stagewise.model.llama import resolved_dims, validate_model_config
from stagewise.model.loss import chunk_rows


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of `Transformer(cfg)`.

    total          unique parameters (a tied head is counted once, as the embedding)
    embedding      the input token table, vocab_size * d_model
    non_embedding  total - embedding (an untied output head counts here)
    matmul         parameters used in matmuls per token: every linear layer plus the output head,
                   even when tied (its vocab x d matmul runs either way); the embedding lookup and
                   norm weights are excluded since they cost no matmul FLOPs
    """
    validate_model_config(cfg)
    n_kv, hd, ffn = resolved_dims(cfg)
    d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    attn = d * hd * (2 * cfg.n_heads + 2 * n_kv)        # wq, wo: H heads; wk, wv: n_kv heads
    mlp = 3 * d * ffn                                   # w1, w2, w3
    norms = (4 if cfg.post_norms else 2) * d + (2 * hd if cfg.qk_norm else 0)  # (+ post-norms, q/k-norm)
    if cfg.attention_bias:
        norms += hd * (cfg.n_heads + 2 * n_kv)          # q/k/v biases: no matmul FLOPs, counted with norms
    embedding = V * d
    head = 0 if cfg.tie_embeddings else V * d
    total = embedding + L * (attn + mlp + norms) + d + head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "matmul": L * (attn + mlp) + V * d}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len` (PaLM appendix B)."""
    _, hd, _ = resolved_dims(cfg)
    return 6 * param_counts(cfg)["matmul"] + 12 * cfg.n_layers * cfg.n_heads * hd * seq_len


def estimate_memory(cfg: ModelConfig, batch_size: int, seq_len: int, param_bytes: int = 4,
                    grad_bytes: int = 4, optim_bytes_per_param: int = 8, act_bytes: int = 4,
                    fused_loss: bool = True, gemm_bytes: int | None = None, checkpointing: str = "none",
                    checkpoint_every: int = 1) -> dict[str, int]:
    """Training memory in bytes. `act_bytes` is the matmul compute width: 4 for fp32, 2 under bf16
    autocast with fp32 weights (the configuration stagewise trains in).

    activations counts what autograd saves for this implementation (derived op by op and checked
    against torch.autograd.graph.saved_tensors_hooks in tests/test_model.py), per token:
      RMSNorm      its fp32 input and the fp32 rstd (backward recomputes the normalised x);
                   its output is saved once more, at act_bytes, as the next linears' shared input
                   (under autocast the pre-norms return the compute dtype, so wq/wk/wv and w1/w3
                   share one copy instead of casting their own)
      attention    q and k after RoPE, v, the SDPA output (its [B,T,H,hd] layout makes wo's input a
                   view of it) at act_bytes, plus SDPA's fp32 logsumexp per head. RoPE saves no
                   activations (cos/sin need no grad), and the flash kernel saves no T x T scores;
                   with enable_gqa, k and v are saved at n_kv_heads width
      QK-norm      its input (the q/k projections' output, at act_bytes) and the fp32 rstd, at head_dim
                   width for every q and kv head
      SwiGLU       w1 and w3 outputs, silu(w1 x), and the product fed to w2, at act_bytes
      model        int64 token ids (embedding backward), the final norm and the head's input
      autocast     when act_bytes != param_bytes, a low-precision copy of every matmul weight, kept
                   for the backward of the input's gradient; when act_bytes != 4, the cos/sin
                   tables cast to the compute dtype (4 per layer, seq_len x head_dim, not per row)
    logits is the loss's peak working set (the forward's highest point above the activations), as
    the memory probe measures it (stagewise/memory/measure.py). With fused_loss (model/loss.py, the
    default training path): the stored gradients for the hidden states (act_bytes) and the head's
    weight (fp32); the head weight rounded to the compute dtype and held at the GEMMs' width (not in
    fp32, where it is the weight itself); the buffers one chunk reuses — its logits (at `gemm_bytes`,
    4 under the CPU bf16 emulation, else act_bytes) and fp32 probabilities, in native low precision
    also the fp32 copy of the logits the softmax makes, under the emulation a bf16 rounding buffer
    and the hidden states widened to fp32 — and with more than one chunk in native low precision the
    weight-gradient GEMM's buffer. loss_stored is what the forward leaves for the backward beyond the
    activations: the head weight's fp32 gradient (the hidden-state gradient replaces the head's input,
    which is freed). Without the fused loss, B*T*V logits at act_bytes, the fp32 copy the
    log-softmax saves, and one fp32 gradient of the same size during backward.
    checkpointing/checkpoint_every: activation checkpointing (model/checkpointing.py).
    backward_held: what the backward holds beside the gradients at its high point (see below).
    """
    counts = param_counts(cfg)
    a, N = act_bytes, batch_size * seq_len
    acts = _activations(cfg, N, seq_len, a, param_bytes, fused_loss, checkpointing, checkpoint_every)
    out = {
        "params": param_bytes * counts["total"],
        "grads": grad_bytes * counts["total"],
        "optimizer": optim_bytes_per_param * counts["total"],
        "activations": acts["saved"],
        "logits": N * cfg.vocab_size * (a + 4 + 4),
        "loss_stored": N * cfg.vocab_size * (a + 4),  # unfused: the logits and the saved log-softmax
    }
    if fused_loss:
        # Stored to the backward: the gradients for the hidden states (act_bytes) and the head weight
        # (fp32); the head's input, no longer needed, is freed, so the forward ends V*d*4 higher.
        out["loss_stored"] = cfg.vocab_size * cfg.d_model * 4
        out["logits"] = _fused_loss_peak(cfg, N, a, param_bytes, gemm_bytes or a)
    # What the backward holds beside the gradients at its high point: one block's full activations
    # (the last still held, or a checkpointed block's recompute) and that block's gradient buffers.
    _, _, ffn = resolved_dims(cfg)
    out["backward_held"] = N * (acts["per_layer"] + 4 * (2 * ffn + 2 * cfg.d_model))
    # autocast caches each weight's cast for the whole forward; a checkpointed block's copies are saved
    # by nothing, but live until autocast exits (native low precision; the emulation casts per call)
    autocast = act_bytes != param_bytes
    out["autocast_cache"] = (a * acts["checkpointed"] * acts["block_matmul"]
                             if autocast and (gemm_bytes or a) == a else 0)
    out["total"] = sum(v for k, v in out.items() if k not in ("loss_stored", "backward_held", "autocast_cache"))
    return out


def _activations(cfg: ModelConfig, N: int, seq_len: int, a: int, param_bytes: int, fused_loss: bool,
                 checkpointing: str, checkpoint_every: int) -> dict[str, int]:
    """What autograd saves for N tokens (estimate_memory's docstring lists it op by op): saved (bytes),
    per_layer (one un-checkpointed block's bytes per token), checkpointed (blocks), block_matmul
    (one block's matmul parameters)."""
    n_kv, hd, ffn = resolved_dims(cfg)
    counts = param_counts(cfg)
    d, H = cfg.d_model, cfg.n_heads
    norm = lambda width, rows=1: rows * (4 * width + 4)  # noqa: E731 - fp32 input, fp32 rstd
    per_layer = (2 * norm(d) + 2 * a * d                 # two RMSNorms and their saved outputs
                 + a * (2 * H + 2 * n_kv) * hd + 4 * H   # q, k, v, out; logsumexp
                 + 4 * a * ffn)                          # SwiGLU
    if cfg.qk_norm:
        per_layer += (H + n_kv) * (a * hd + 4)  # QK-norm input at act_bytes (the q/k projection's output), fp32 rstd
    # Activation checkpointing (model/checkpointing.py): a checkpointed block keeps its fp32 input;
    # a selective one also every matmul's output (q/k/v/o, SDPA's output and logsumexp, w1/w3/w2);
    # neither keeps its autocast weight copies (recomputed with the rest).
    selective = 4 * d + a * ((H + 2 * n_kv) * hd + H * hd + 2 * d + 2 * ffn) + 4 * H
    kept = {"none": per_layer, "full": 4 * d, "selective": selective}[checkpointing]
    checkpointed = 0 if checkpointing == "none" else -(-cfg.n_layers // checkpoint_every)
    block_matmul = (counts["matmul"] - cfg.vocab_size * d) // max(cfg.n_layers, 1)
    saved = N * ((cfg.n_layers - checkpointed) * per_layer + checkpointed * kept + norm(d) + a * d + 8)
    if a != param_bytes:  # the saved weight copies; the fused loss's copy of the head is its own transient
        saved += a * (counts["matmul"] - checkpointed * block_matmul - (cfg.vocab_size * d if fused_loss else 0))
    if a != 4:  # the cos/sin casts, saved by RoPE's products (recomputed in checkpointed blocks)
        saved += (cfg.n_layers - checkpointed) * 4 * seq_len * hd * a
    return {"saved": saved, "per_layer": per_layer, "checkpointed": checkpointed, "block_matmul": block_matmul}


def _fused_loss_peak(cfg: ModelConfig, N: int, a: int, param_bytes: int, g: int) -> int:
    """The fused loss's (model/loss.py) peak working set above the activations, for N rows computed at
    act_bytes `a` with GEMM buffers of `g` bytes (estimate_memory's docstring: `logits`)."""
    V, d = cfg.vocab_size, cfg.d_model
    chunks = -(-N // chunk_rows(V, d, a))
    rows = -(-N // chunks)
    peak = N * d * a + V * d * 4
    if a != param_bytes or g != a:  # the weight rounded to the compute dtype, held at the GEMMs' width
        peak += V * d * g
    if g == 4 and a == 4:    # fp32: logits and probabilities buffers
        peak += rows * V * 8
    elif g == 4:             # CPU bf16 emulation: fp32 logits and probabilities, a bf16 rounding buffer,
        peak += rows * V * (8 + a) + N * d * 4  # the hidden states widened to fp32
    else:                    # native low precision: the logits, and at the softmax both their fp32 copy and
        peak += rows * V * (a + 8) + (V * d * a if chunks > 1 else 0)  # the fp32 probabilities; wgrad buffer
    if g == 4:  # the hidden-state gradient's product and mask (2 x rows x d) while both buffers are live
        peak += rows * 2 * d * g
    return peak + rows * 48  # ~48 bytes of row vectors (targets, masks, maxima, log-sum-exp)
