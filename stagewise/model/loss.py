"""Cross-entropy fused with the output projection, computed in row chunks.

The plain objective materialises logits [N, V] in the compute dtype, an fp32 copy for the
log-softmax, the saved log-softmax output and, in backward, an fp32 gradient of the same size:
at N = 4096 tokens and V = 8192 that is four buffers of 67-134 MB, the largest activations of a
small model. Here each chunk of rows computes its logits, its loss and — when a gradient will be
needed — its gradient with respect to the hidden states and the output weight, then drops the
logits. Backward only scales the stored gradients by the incoming scalar. Same arithmetic as the
reference (GEMM in the compute dtype, softmax in fp32, the fp32 softmax gradient rounded to the
compute dtype before the two backward GEMMs); it differs only in where rounding happens:
  * the output weight's gradient is summed over chunks in fp32 (the reference rounds the whole
    bf16 GEMM result once), and
  * the softmax gradient is rounded before being multiplied by the incoming gradient
    (1 / target count), not after.
Both are bf16-rounding-level differences; tests/test_fused_loss.py and tests/test_model.py bound
them against the reference at 8k, 152k and 262k vocabularies.

Speed at large vocabularies (Gemma 3: 262k) comes from few, tall, equal chunks (chunk_rows), one
set of [rows, V] buffers reused by every chunk, the loss taken from the softmax (no separate
log-softmax pass), and the weight gradient accumulated in place. Under the CPU bf16 emulation
(precision/cpu_bf16.py) the GEMMs run here in fp32 on bf16-rounded operands widened once per
call, and their outputs are rounded to bf16 in place, as the emulated linear layers do.

Liger-Kernel's fused linear cross-entropy popularised computing the gradient inside forward;
this is a CPU/GPU-agnostic PyTorch version of that idea, no custom kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack

from stagewise.precision.cpu_bf16 import BF16GemmEmulation

IGNORE_INDEX = -100


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused reference: summed cross-entropy of materialised logits [..., V], in fp32
    (bf16 log-softmax over a large vocabulary loses ~2 decimal digits)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunk_rows(vocab_size: int, d_model: int, compute_bytes: int = 2) -> int:
    """Rows per chunk: as many as fit in the memory the head's own fp32 weight gradient takes.

    Tall chunks are fast: each chunk costs one pass over that [V, d] fp32 accumulator besides its
    GEMMs, and the logits GEMM itself ran at 73 GFLOP/s with 128 rows against 85 with 256 and
    105-116 with 512-1024 (V 262k, d 640, fp32, 2-core AVX2 EPYC; bench/README.md). A chunk holds
    rows x V logits, their fp32 probabilities and a compute-dtype copy, counted as rows x V x
    (2 x compute bytes + 4); capped at V x d x 4 bytes, the loss's buffers never outgrow the head's
    own gradient, whatever the vocabulary. That is d / 2 rows in bf16 (Gemma 3 270m: 320, Qwen3
    0.6B: 512, Llama 3.2 1B: 1024), d / 3 in fp32, and never fewer than 2^23 / V (32 MB of fp32
    probabilities) for small vocabularies. The rows are then split into equal chunks (1024 rows
    at 320 per chunk: 4 x 256). Twice that cap (512-row chunks for Gemma) measured no faster
    within the noise of a full step and 0.3 GiB more peak RSS.
    """
    per_row = vocab_size * (2 * compute_bytes + 4)  # logits, fp32 probabilities, a compute-dtype copy
    return max(1, (1 << 23) // vocab_size, (4 * vocab_size * d_model) // per_row)


def _gemm_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 under the CPU bf16 emulation (its GEMMs run on bf16-rounded fp32 values), else the
    compute dtype."""
    if compute_dtype == torch.bfloat16 and any(isinstance(m, BF16GemmEmulation)
                                               for m in _get_current_function_mode_stack()):
        return torch.float32
    return compute_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk, need_h, need_w):
        gemm = _gemm_dtype(compute_dtype)
        # Operands rounded to the compute dtype once, held in the dtype the GEMMs run in (the same
        # tensor unless emulating bf16, where the widened weight is made once, not per GEMM).
        hc = h.to(compute_dtype).to(gemm)
        wc = weight.to(compute_dtype).to(gemm)
        n, V = hc.shape[0], wc.shape[0]
        chunk = -(-n // -(-n // chunk))  # equal chunks: 1024 rows in chunks of at most 320 are 4 x 256
        # Under the emulation the GEMM outputs are rounded to bf16 in place, as the native GEMM's are
        # (through one reused bf16 buffer, see below).
        rnd = lambda t: t  # noqa: E731
        if gemm != compute_dtype:
            round_buf = torch.empty((min(chunk, n), V), dtype=compute_dtype, device=h.device)
            rnd = lambda t: t.copy_(round_buf[:t.shape[0]].copy_(t))  # noqa: E731
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty(hc.shape, dtype=compute_dtype, device=h.device) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        # Every chunk reuses the same logits and probability buffers: a fresh [rows, V] allocation
        # per chunk costs its page faults again (a reused softmax output ran 0.21 s against 0.57 s
        # freshly allocated for 1024 x 262k). A low-precision weight-gradient GEMM writes into one
        # reused buffer that is then added to the fp32 sum in place; an fp32 one accumulates into it.
        logits_buf = torch.empty((min(chunk, n), V), dtype=gemm, device=h.device)
        probs_buf = torch.empty((min(chunk, n), V), dtype=torch.float32, device=h.device) \
            if gemm == torch.float32 else None
        wgrad_buf = torch.empty(weight.shape, dtype=gemm, device=weight.device) \
            if need_w and gemm != torch.float32 and n > chunk else None
        for s in range(0, n, chunk):
            x, t = hc[s:s + chunk], targets[s:s + chunk]
            m = x.shape[0]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            logits = rnd(torch.mm(x, wc.t(), out=logits_buf[:m]))
            if probs_buf is None:  # native low precision: one kernel reads bf16, writes fp32
                probs = torch.softmax(logits, dim=1, dtype=torch.float32)
            else:
                probs = torch._softmax(logits, 1, False, out=probs_buf[:m])
            # -log p[target] = log-sum-exp - logit[target], with log-sum-exp = max logit - log p[max]:
            # p at the row's maximum is >= 1 / V, so it never underflows as p[target] can (a target
            # logit ~87+ below the log-sum-exp), and no branch (no host sync) is needed for such rows.
            l_max, i_max = logits.max(dim=1, keepdim=True)
            lse = l_max.float() - torch.log(probs.gather(1, i_max))
            nll = (lse - logits.gather(1, safe_t).float()).squeeze(1)
            loss += torch.where(valid, nll, 0.0).sum()
            if dh is None and dw is None:
                continue
            # d loss_sum / d logits = softmax - onehot(target); ignored rows are zeroed through
            # their (small) hidden-state rows below instead of a pass over [rows, V].
            probs.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=probs.dtype))
            g = rnd(probs) if probs_buf is not None else logits.copy_(probs)  # native: into the bf16 buffer
            del probs
            keep = valid.unsqueeze(1).to(gemm)
            if dh is not None:
                dh[s:s + m] = (g @ wc) * keep
            if dw is not None:
                xk = x * keep
                if gemm == torch.float32:
                    dw.addmm_(g.t(), xk)
                elif wgrad_buf is None:
                    dw.add_(g.t() @ xk)
                else:
                    dw.add_(torch.mm(g.t(), xk, out=wgrad_buf))
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        gh = dh.to(ctx.h_dtype) * grad_loss.to(ctx.h_dtype) if dh is not None else None
        gw = (dw * grad_loss).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         compute_dtype: torch.dtype, chunk: int | None = None) -> torch.Tensor:
    """Sum over non-ignored rows of cross_entropy(h @ weight.T, targets), fp32 scalar.

    h [N, d], weight [V, d], targets [N] (IGNORE_INDEX rows count nothing). The logits GEMMs run in
    `compute_dtype`; softmax and the loss in fp32. Runs outside autocast (the caller passes the
    dtype autocast would have used).
    """
    grad = torch.is_grad_enabled()
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, compute_dtype, chunk or chunk_rows(*weight.shape, compute_dtype.itemsize),
                                         grad and h.requires_grad, grad and weight.requires_grad)


# ---- per-token log-probabilities --------------------------------------------------------------
#
# Preference and policy-gradient objectives (DPO, GRPO, ...) weight each token's log p(target) on
# its own, so the head's backward needs an arbitrary per-row output gradient, not one scalar: the
# gradient cannot be formed in forward as _LinearCrossEntropy does. Forward keeps only the
# per-row log-sum-exp ([N] fp32); backward recomputes each chunk's logits and exp(logits - lse).


def logits_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused reference: log p(target) of materialised logits [..., V], fp32 [...], 0.0 where
    the target is IGNORE_INDEX (log-softmax in fp32, as for logits_cross_entropy)."""
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def _rounder(gemm: torch.dtype, compute_dtype: torch.dtype, rows: int, V: int, device):
    """In-place rounding of fp32 GEMM outputs to the compute dtype under the bf16 emulation (through
    one reused buffer, as in _LinearCrossEntropy); the identity otherwise."""
    if gemm == compute_dtype:
        return lambda t: t
    buf = torch.empty((rows, V), dtype=compute_dtype, device=device)
    return lambda t: t.copy_(buf[:t.shape[0]].copy_(t))


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk):
        gemm = _gemm_dtype(compute_dtype)
        hc, wc = h.to(compute_dtype).to(gemm), weight.to(compute_dtype).to(gemm)
        n, V = hc.shape[0], wc.shape[0]
        chunk = -(-n // -(-n // chunk))  # equal chunks, as in _LinearCrossEntropy
        rnd = _rounder(gemm, compute_dtype, min(chunk, n), V, h.device)
        logits_buf = torch.empty((min(chunk, n), V), dtype=gemm, device=h.device)
        probs_buf = torch.empty((min(chunk, n), V), dtype=torch.float32, device=h.device) \
            if gemm == torch.float32 else None
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            t = targets[s:s + chunk]
            logits = rnd(torch.mm(hc[s:s + chunk], wc.t(), out=logits_buf[:t.shape[0]]))
            valid = t != IGNORE_INDEX
            # log-sum-exp from the row maximum's probability (>= 1/V, never underflows), as the loss.
            probs = torch.softmax(logits, dim=1, dtype=torch.float32) if probs_buf is None \
                else torch._softmax(logits, 1, False, out=probs_buf[:t.shape[0]])
            l_max, i_max = logits.max(dim=1, keepdim=True)
            row_lse = (l_max.float() - torch.log(probs.gather(1, i_max))).squeeze(1)
            del probs
            picked = logits.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1).float()
            lse[s:s + chunk] = row_lse
            out[s:s + chunk] = torch.where(valid, picked - row_lse, 0.0)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.compute_dtype, ctx.gemm, ctx.chunk = compute_dtype, gemm, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        # Backward may run under the caller's autocast or the bf16 emulation mode; the dtypes here
        # were fixed in forward.
        with torch.autocast(device_type=h.device.type, enabled=False):
            dh, dw = _token_logprobs_grads(h, weight, targets, lse, grad_out, ctx.compute_dtype, ctx.gemm,
                                           ctx.chunk, need_h, need_w)
        return (dh.to(h.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None, None, None, None)


def _token_logprobs_grads(h, weight, targets, lse, grad_out, compute_dtype, gemm, chunk, need_h, need_w):
    """d sum_i g_i log p_i / d logits_i = g_i (onehot(target_i) - softmax(logits_i)), per chunk; the
    product by g_i is taken in fp32 before rounding to the compute dtype (each row has its own scale)."""
    hc, wc = h.to(compute_dtype).to(gemm), weight.to(compute_dtype).to(gemm)
    n, V = hc.shape[0], wc.shape[0]
    rnd = _rounder(gemm, compute_dtype, min(chunk, n), V, h.device)
    logits_buf = torch.empty((min(chunk, n), V), dtype=gemm, device=h.device)
    probs_buf = torch.empty((min(chunk, n), V), dtype=torch.float32, device=h.device)
    dh = torch.empty(hc.shape, dtype=compute_dtype, device=h.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    valid_all = targets != IGNORE_INDEX
    g_all = torch.where(valid_all, grad_out.float(), 0.0)  # ignored rows contribute nothing
    for s in range(0, n, chunk):
        x, t = hc[s:s + chunk], targets[s:s + chunk]
        m = x.shape[0]
        logits = rnd(torch.mm(x, wc.t(), out=logits_buf[:m]))
        probs = probs_buf[:m].copy_(logits).sub_(lse[s:s + m, None]).exp_()
        g = g_all[s:s + m, None]
        safe_t = torch.where(valid_all[s:s + m], t, 0).unsqueeze(1)
        probs.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=probs.dtype))
        dlogits = probs.mul_(-g)  # g * (onehot - softmax)
        dlogits = rnd(dlogits) if gemm == torch.float32 else logits.copy_(dlogits)
        if dh is not None:
            dh[s:s + m] = dlogits @ wc
        if dw is not None:
            dw.addmm_(dlogits.t(), x) if gemm == torch.float32 else dw.add_(dlogits.t() @ x)
    return dh, dw


def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          compute_dtype: torch.dtype, chunk: int | None = None) -> torch.Tensor:
    """log softmax(h @ weight.T)[i, targets[i]] per row, fp32 [N]; 0.0 where targets is IGNORE_INDEX.

    h [N, d], weight [V, d]. Same precision as linear_cross_entropy (GEMMs in `compute_dtype`,
    softmax in fp32, row chunks of chunk_rows), and differentiable for any output gradient, so the
    result can be weighted per token. Runs outside autocast (the caller passes its dtype).
    """
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _LinearTokenLogprobs.apply(h, weight, targets, compute_dtype,
                                          chunk or chunk_rows(*weight.shape, compute_dtype.itemsize))
