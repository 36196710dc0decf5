"""Fast Walsh–Hadamard rotation along the last dim (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

H_n is the Sylvester Hadamard matrix divided by sqrt(n): orthonormal and symmetric, so
H H^T = I and, rotating both operands of a linear layer along the contraction dim,

    x W^T = (x H)(W H)^T.

Rotation spreads outliers across a block, so a per-block or per-channel quantiser sees a flatter
distribution. For a dim n that is not a power of two the rotation is block-diagonal: blocks of
b = the largest power of two dividing n (n & -n), H = I_{n/b} ⊗ H_b. An odd n gives b = 1, i.e.
no rotation. O(n log b) adds per row; computed in at least fp32, returned in x's dtype.
"""

from __future__ import annotations

import math

import torch


def hadamard_block(n: int) -> int:
    """The block size used for a last dim of n: the largest power of two dividing n."""
    if n < 1:
        raise ValueError(f"hadamard dim {n}: must be >= 1")
    return n & -n


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dim (orthonormal; block-diagonal for non-power-of-two dims)."""
    n = x.shape[-1]
    b = hadamard_block(n)
    lead = x.shape[:-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, n // b, b)
    h = 1
    while h < b:
        y = y.reshape(-1, n // b, b // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2).reshape(-1, n // b, b)
        h *= 2
    return (y / math.sqrt(b)).reshape(*lead, n).to(x.dtype)
