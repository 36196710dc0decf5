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
Both are bf16-rounding-level differences; tests/test_model.py bounds them against the reference.

Liger-Kernel's fused linear cross-entropy popularised computing the gradient inside forward;
this is a CPU/GPU-agnostic PyTorch version of that idea, no custom kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused reference: summed cross-entropy of materialised logits [..., V], in fp32
    (bf16 log-softmax over a large vocabulary loses ~2 decimal digits)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunk_rows(vocab_size: int, budget_elements: int = 1 << 23) -> int:
    """Rows per chunk so one chunk's fp32 log-probabilities take about 32 MB."""
    return max(1, budget_elements // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, chunk, need_h, need_w):
        hc = h.to(compute_dtype)
        wc = weight.to(compute_dtype)
        n = hc.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(hc) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            x, t = hc[s:s + chunk], targets[s:s + chunk]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            # One fused kernel reads the compute-dtype logits and writes fp32 log-probabilities.
            logp = torch.log_softmax(x @ wc.t(), dim=1, dtype=torch.float32)
            loss -= torch.where(valid, logp.gather(1, safe_t).squeeze(1), 0.0).sum()
            if dh is None and dw is None:
                continue
            # d loss_sum / d logits = softmax - onehot(target); ignored rows are zeroed through
            # their (small) hidden-state rows below instead of a pass over [rows, V].
            g = logp.exp_().scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=logp.dtype)).to(compute_dtype)
            keep = valid.unsqueeze(1).to(compute_dtype)
            if dh is not None:
                dh[s:s + chunk] = (g @ wc) * keep
            if dw is not None:
                dw += (g.t() @ (x * keep)).float()
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
        return _LinearCrossEntropy.apply(h, weight, targets, compute_dtype, chunk or chunk_rows(weight.shape[0]),
                                         grad and h.requires_grad, grad and weight.requires_grad)
