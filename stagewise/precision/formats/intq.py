"""Symmetric integer fake quantisation: int8, int4, ternary (BitNet b1.58).

All are symmetric absmax (or absmean) schemes with round-half-to-even (torch.round):
  int8   s = absmax / 127, q = clamp(round(x / s), -127, 127)   per tensor, per channel or per token
  int4   s = absmax / 7,   q = clamp(round(x / s), -7, 7)       per channel (row) or per group
         (the grid is [-7, 7]: with absmax scaling -8 can never be produced, so [-8, 7] and
         [-7, 7] give identical results; -7..7 keeps the grid symmetric)
  ternary (BitNet b1.58, Ma et al. 2024) weights: s = mean(|W|) over the tensor ("absmean"),
         q = clamp(round(W / s), -1, 1); activations are int8 absmax per token.
A zero scale (all-zero slice) is replaced by 1, as the eps in BitNet's reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5  # BitNet's reference code clamps its absmean/absmax with this


def _sym(x: torch.Tensor, absmax: torch.Tensor, qmax: int):
    """(dequantised fp32, clipped count) for a symmetric grid [-qmax, qmax] with s = absmax / qmax."""
    s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    y = x / s
    q = torch.round(y).clamp(-qmax, qmax)
    return q * s, (y.abs() > qmax + 0.5).sum()


def _fq_int8(x: torch.Tensor, dim: int | None = None):
    """dim None: one scale for the tensor; dim d: one scale per index along d (per channel)."""
    xf = x.float()
    if dim is None:
        absmax = xf.abs().amax()
    else:
        dims = [i for i in range(xf.dim()) if i != dim % xf.dim()]
        absmax = xf.abs().amax(dim=dims, keepdim=True)
    q, clipped = _sym(xf, absmax, 127)
    return q.to(x.dtype), clipped


def fake_quant_int8(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Symmetric int8; dim=None per tensor, dim=0 per output channel of a [out, in] weight."""
    return _fq_int8(x, dim)[0]


def _fq_int8_per_token(x: torch.Tensor):
    xf = x.float()
    q, clipped = _sym(xf, xf.abs().amax(-1, keepdim=True), 127)
    return q.to(x.dtype), clipped


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8 absmax with one scale per row of the last dim (per token) — BitNet's activations."""
    return _fq_int8_per_token(x)[0]


def _fq_int4(x: torch.Tensor, group_size: int | None = None):
    xf = x.float()
    if group_size is None:  # per channel: one scale per row of the last dim
        q, clipped = _sym(xf, xf.abs().amax(-1, keepdim=True), 7)
        return q.to(x.dtype), clipped
    n = xf.shape[-1]
    pad = (-n) % group_size
    if pad:
        xf = F.pad(xf, (0, pad))
    g = xf.reshape(*xf.shape[:-1], -1, group_size)
    q, clipped = _sym(g, g.abs().amax(-1, keepdim=True), 7)
    return q.reshape(*xf.shape)[..., :n].to(x.dtype), clipped


def fake_quant_int4(x: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Symmetric int4 in [-7, 7]; per row of the last dim, or per `group_size` contiguous elements of it."""
    return _fq_int4(x, group_size)[0]


def _fq_ternary(w: torch.Tensor):
    wf = w.float()
    s = wf.abs().mean().clamp(min=_EPS)
    y = wf / s
    q = torch.round(y).clamp(-1, 1)
    return (q * s).to(w.dtype), (y.abs() > 1.5).sum()


def fake_quant_ternary(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58 weights: W ≈ clamp(round(W / mean|W|), -1, 1) * mean|W|."""
    return _fq_ternary(w)[0]
