"""Block-scaled FP4: E2M1 elements with a shared scale per block (MXFP4, NVFP4).

E2M1 magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}; rounding is to nearest, ties to the value
with an even mantissa bit (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4), and magnitudes
above 6 saturate to 6 (E2M1 has no inf/NaN). NaN inputs stay NaN in the fake-quantised result.

MXFP4 (OCP Microscaling Formats spec v1.0, §6.3): blocks of 32 along the last dim, one E8M0
(power-of-two) scale per block, X = 2^(floor(log2(amax)) - emax_elem) with emax_elem = 2 for
E2M1, clamped to E8M0's range [2^-127, 2^127]. Elements are x / X rounded to E2M1; because
amax / X lies in [4, 8), the block's largest values in (6, 8) saturate to 6 — the spec's rule.

NVFP4 (NVIDIA, Blackwell; as in Transformer Engine's NVFP4 recipe): blocks of 16, a per-block
decode scale stored in FP8 E4M3 and one per-tensor fp32 scale so that the E4M3 block scales use
their range:
    s_global = 448 * 6 / amax(tensor)                 (fp32; 1 when amax = 0)
    s_block  = e4m3(amax(block) / 6 * s_global)        (stored; round-to-nearest-even, saturating)
    q        = e2m1(x * s_global / s_block)            (0 when s_block rounded to 0)
    x̂        = q * s_block / s_global
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E2M1_MAX = 6.0
E2M1_EMAX = 2
MX_BLOCK = 32
NV_BLOCK = 16
E4M3_MAX = 448.0


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values onto the E2M1 grid (nearest, ties to even), saturating at ±6."""
    a = x.abs()
    # The grid has spacing 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]; torch.round is half-to-even,
    # which on each segment's scaled integers is exactly E2M1's even-mantissa tie rule.
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(q.clamp(max=E2M1_MAX), x)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """(x as fp32 [..., n_blocks, block], original last dim); the last dim is zero-padded."""
    n = x.shape[-1]
    pad = (-n) % block
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, pad))
    return xf.reshape(*xf.shape[:-1], -1, block), n


def _unblock(q: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    return q.reshape(*q.shape[:-2], -1)[..., :n].to(like.dtype)


def mxfp4_scales(xb: torch.Tensor) -> torch.Tensor:
    """E8M0 scale per block of xb [..., n_blocks, 32] (as fp32, shape [..., n_blocks, 1])."""
    amax = xb.abs().amax(-1, keepdim=True)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly.
    _, e = torch.frexp(amax)
    exp = (e - 1 - E2M1_EMAX).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
    return torch.exp2(exp.float())


def _fq_mxfp4(x: torch.Tensor):
    xb, n = _blocks(x, MX_BLOCK)
    scale = mxfp4_scales(xb)
    y = xb / scale
    q = round_to_e2m1(y) * scale
    return _unblock(q, n, x), (y.abs() > E2M1_MAX).sum()


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x rounded through MXFP4 and back; same shape and dtype as x."""
    return _fq_mxfp4(x)[0]


def nvfp4_scales(xb: torch.Tensor, amax_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_global fp32 scalar, s_block [..., n_blocks, 1] e4m3 values as fp32) for xb [..., n_blocks, 16]."""
    if amax_tensor is None:
        amax_tensor = xb.abs().amax()
    s_global = torch.where(amax_tensor > 0, E4M3_MAX * E2M1_MAX / amax_tensor, torch.ones_like(amax_tensor))
    block_amax = xb.abs().amax(-1, keepdim=True)
    s_block = (block_amax / E2M1_MAX * s_global).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    return s_global, s_block


def _fq_nvfp4(x: torch.Tensor):
    xb, n = _blocks(x, NV_BLOCK)
    s_global, s_block = nvfp4_scales(xb)
    enc = torch.where(s_block > 0, s_global / s_block, torch.zeros_like(s_block))
    y = xb * enc
    q = round_to_e2m1(y) * (s_block / s_global)
    return _unblock(q, n, x), (y.abs() > E2M1_MAX).sum()


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """x rounded through NVFP4 (16-blocks, e4m3 block scales, fp32 tensor scale) and back."""
    return _fq_nvfp4(x)[0]
