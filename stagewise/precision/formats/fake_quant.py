"""Quantisation-aware training: straight-through fake quantisation and QuantLinear.

Forward rounds through a format and back (values on the format's grid, tensor in its own
dtype); backward passes the gradient through the rounding unchanged — the straight-through
estimator (Bengio et al. 2013), as in standard QAT and BitNet's training. Gradients can
themselves be rounded (grad_format) to study low-precision backward passes.

How each format is applied, by role (rows are the last dim: a weight's output channel, an
activation's or a gradient's token):
  int8      per row absmax/127 (per output channel for W, per token for x and grad)
  int4      per row absmax/7, or per `group_size` contiguous elements of the row
  ternary   per tensor absmean (BitNet b1.58); meant for weights
  mxfp4     32-blocks along the last dim, E8M0 scales
  nvfp4     16-blocks along the last dim, e4m3 block scales + fp32 tensor scale
  fp8_e4m3 / fp8_e5m2   per tensor, current scaling (max / amax), saturating

Quantisers run in fp32 and return the input's dtype. Under bf16 autocast the matmul then rounds
the fake-quantised operands to bf16: exact for int8/int4/ternary codes times a power-of-two
scale and for MXFP4 and fp8 values, within 2^-9 relative otherwise (arbitrary fp32 scales).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stagewise.precision.formats import blockfp4, intq
from stagewise.precision.formats.fp8 import E4M3, E5M2, CurrentScaling, quantize_fp8, dequantize_fp8
from stagewise.precision.formats.hadamard import fwht

FORMAT_NAMES = ("mxfp4", "nvfp4", "int8", "int4", "ternary", "fp8_e4m3", "fp8_e5m2")


def _fq_fp8(fmt):
    def fq(x, group_size=None):
        scale = CurrentScaling(fmt)(x)
        x8, _ = quantize_fp8(x, fmt, scale)
        clipped = ((x.float() * scale).abs() > fmt.max).sum()
        return dequantize_fp8(x8, scale, x.dtype), clipped
    return fq


# name -> fn(x, group_size) -> (fake-quantised x, number of clipped/saturated elements)
_QUANTIZERS: dict[str, Callable] = {
    "mxfp4": lambda x, group_size=None: blockfp4._fq_mxfp4(x),
    "nvfp4": lambda x, group_size=None: blockfp4._fq_nvfp4(x),
    "int8": lambda x, group_size=None: intq._fq_int8_per_token(x),
    "int4": lambda x, group_size=None: intq._fq_int4(x, group_size),
    "ternary": lambda x, group_size=None: intq._fq_ternary(x),
    "fp8_e4m3": _fq_fp8(E4M3),
    "fp8_e5m2": _fq_fp8(E5M2),
}


def check_format(name: str | None, what: str = "format") -> None:
    if name is not None and name not in _QUANTIZERS:
        raise ValueError(f"{what} {name!r}: valid are None or one of {list(FORMAT_NAMES)}")


def fake_quant(x: torch.Tensor, fmt: str, group_size: int | None = None,
               stats: dict | None = None) -> torch.Tensor:
    """x rounded through `fmt` and back (no gradient rule: wrap in ste() for training).

    With `stats`, fills {"underflow": fraction of nonzero elements rounded to 0,
    "clipped": fraction saturated at the format's largest value} as 0-d tensors (no host sync).
    """
    check_format(fmt)
    q, clipped = _QUANTIZERS[fmt](x.detach() if stats is not None else x, group_size)
    if stats is not None:
        n = max(x.numel(), 1)
        stats["underflow"] = ((x.detach() != 0) & (q == 0)).sum() / n
        stats["clipped"] = clipped / n
    return q


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, group_size, stats):
        return fake_quant(x, fmt, group_size, stats)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


def ste(x: torch.Tensor, fmt: str | None, group_size: int | None = None, stats: dict | None = None) -> torch.Tensor:
    """Forward: fake_quant(x); backward: identity (straight-through)."""
    if fmt is None:
        return x
    return _STE.apply(x, fmt, group_size, stats)


class _QuantGrad(torch.autograd.Function):
    """Identity forward; backward rounds the incoming gradient through `fmt`."""

    @staticmethod
    def forward(ctx, x, fmt, group_size, stats):
        ctx.fmt, ctx.group_size, ctx.stats = fmt, group_size, stats
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return fake_quant(g, ctx.fmt, ctx.group_size, ctx.stats), None, None, None


def quant_grad(x: torch.Tensor, fmt: str | None, group_size: int | None = None, stats: dict | None = None):
    if fmt is None:
        return x
    return _QuantGrad.apply(x, fmt, group_size, stats)


class QuantLinear(nn.Module):
    """y = Q_a(x H) Q_w(W H)^T + b with straight-through gradients; the *same* Parameters as `linear`.

    hadamard=True rotates the contraction dim of both operands first (exact in real arithmetic:
    x W^T = (x H)(W H)^T), so the quantisers see rotated, outlier-spread values. grad_format
    rounds grad_output before it reaches the matmul's backward. Parameter names match nn.Linear.
    """

    def __init__(self, linear: nn.Linear, *, weight_format: str | None = None, act_format: str | None = None,
                 grad_format: str | None = None, group_size: int | None = None, hadamard: bool = False,
                 telemetry: bool = True):
        super().__init__()
        for what, f in (("weight_format", weight_format), ("act_format", act_format), ("grad_format", grad_format)):
            check_format(f, what)
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size {group_size}: must be a positive integer or None")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_format, self.act_format, self.grad_format = weight_format, act_format, grad_format
        self.group_size, self.hadamard = group_size, hadamard
        # The underflow/clipped fractions cost a few elementwise passes per quantiser call; a
        # precision mode may switch them on only on telemetry steps (as Float8Linear.count_casts).
        self.count_stats = telemetry
        self._tele: dict[str, dict] = {}

    def _stats(self, role: str, fmt: str | None) -> dict | None:
        if not self.count_stats or fmt is None:
            return None
        return self._tele.setdefault(role, {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.hadamard:
            x, w = fwht(x), fwht(w)
        xq = ste(x, self.act_format, self.group_size, self._stats("act", self.act_format))
        wq = ste(w, self.weight_format, self.group_size, self._stats("weight", self.weight_format))
        if xq.dtype != wq.dtype and not torch.is_autocast_enabled(x.device.type):
            wq = wq.to(xq.dtype)
        y = F.linear(xq, wq)
        y = quant_grad(y, self.grad_format, self.group_size, self._stats("grad", self.grad_format))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def telemetry(self) -> dict[str, float]:
        """{role.underflow, role.clipped} fractions of the last forward (act, weight) and backward (grad)."""
        return {f"{role}.{k}": float(v) for role, d in self._tele.items() for k, v in d.items()}

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w={self.weight_format}, "
                f"a={self.act_format}, g={self.grad_format}, group_size={self.group_size}, hadamard={self.hadamard}")
