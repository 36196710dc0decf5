"""bf16 matmuls on CPUs without a native bf16 GEMM, computed as fp32 GEMMs on bf16 values.

A CPU with AVX-512-BF16 or AMX multiplies bf16 matrices in oneDNN at 2-6x its fp32 rate. One
without (an AVX2-only EPYC or Xeon) falls back to a reference kernel: measured on a 2-core AVX2
EPYC, bf16 GEMM ran at ~1 GFLOP/s against fp32's ~80, so a bf16-mixed step was 10-16x slower than
fp32 and the bf16 attention backward 7x slower. That makes every bf16 mode unusable there.

What a native bf16 GEMM computes is exactly representable in fp32: a product of two bf16
values (8 significant bits each) has at most 16 significant bits, so it is exact in fp32, and the
kernels accumulate in fp32 and round the result to bf16. The emulation therefore computes each
matmul-family op (linear, matmul, bmm, scaled_dot_product_attention) in fp32 on inputs rounded
to bf16, and rounds its output to bf16: same values in, same rounding out, only the order of the
fp32 accumulation differs (as it does between any two GEMM kernels). The casts are autograd ops,
so the backward GEMMs see bf16-rounded output gradients and return bf16-rounded input and weight
gradients, as the native backward does. Inside attention the probabilities stay fp32 (the native
CPU kernel rounds them to bf16 before the value matmul); see docs/precision.md.

`STAGEWISE_CPU_BF16=native|emulate` overrides the automatic choice (tests compare the two).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

ENV = "STAGEWISE_CPU_BF16"


@functools.lru_cache(maxsize=None)
def native_bf16_gemm() -> bool:
    """Whether this CPU has a fast bf16 GEMM (oneDNN's bf16 path: AVX-512-BF16, AMX)."""
    choice = os.environ.get(ENV, "auto")
    if choice in ("native", "emulate"):
        return choice == "native"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: keep torch's own kernels


def emulates(device: torch.device) -> bool:
    return device.type == "cpu" and not native_bf16_gemm()


# The emulated GEMMs are custom ops, opaque to torch.compile: traced as plain PyTorch, inductor folds
# the bf16 -> fp32 casts away and runs the GEMMs on bf16 operands, i.e. on the reference kernel
# (measured 21 s per step against 1.1 s eager on the quickstart model).

@torch.library.custom_op("stagewise::emulated_bf16_linear", mutates_args=())
def emulated_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear of bf16 tensors as an fp32 GEMM (bias added before the one rounding), result bf16."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)


@emulated_linear.register_fake
def _(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("stagewise::emulated_bf16_mm", mutates_args=())
def emulated_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] of bf16 tensors as an fp32 GEMM, result rounded to bf16."""
    return torch.mm(a.float(), b.float()).to(torch.bfloat16)


@emulated_mm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


def _linear_setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)  # the bf16 operands: native memory, not 2x
    ctx.has_bias = b is not None


def _linear_backward(ctx, grad):
    x, w = ctx.saved_tensors
    g = grad.reshape(-1, grad.shape[-1])
    need_x, need_w, need_b = ctx.needs_input_grad
    gx = emulated_mm(g, w).reshape(x.shape) if need_x else None
    gw = emulated_mm(g.t(), x.reshape(-1, x.shape[-1])) if need_w else None
    gb = g.float().sum(0).to(torch.bfloat16) if ctx.has_bias and need_b else None
    return gx, gw, gb


emulated_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


class BF16GemmEmulation(TorchFunctionMode):
    """fp32 GEMMs on bf16-rounded inputs, bf16-rounded outputs (see the module doc)."""

    OPS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
           torch.bmm, torch.Tensor.bmm, F.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not (autocast_bf16 or any(t.dtype == torch.bfloat16 for t in tensors)):
            return func(*args, **kwargs)

        def widen(x):
            if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.bfloat16):
                return x.to(torch.bfloat16).float()  # autocast's rounding of fp32 inputs; exact for bf16
            return x

        dest = kwargs.pop("out", None)  # out=: computed like any call, then written where the caller asked
        with torch.autocast("cpu", enabled=False):
            if func is F.linear:
                x, w, b = _linear_args(args, kwargs)
                return emulated_linear(*(None if t is None else t.to(torch.bfloat16) for t in (x, w, b)))
            args, kwargs = tree_map(widen, (args, kwargs))
            out = func(*args, **kwargs)
        out = tree_map(lambda y: y.to(torch.bfloat16) if isinstance(y, torch.Tensor) and y.is_floating_point() else y,
                       out)
        if dest is None:
            return out
        with torch.no_grad():
            dest.copy_(out)
        return dest


def _linear_args(args, kwargs):
    x = args[0] if args else kwargs["input"]
    w = args[1] if len(args) > 1 else kwargs["weight"]
    return x, w, args[2] if len(args) > 2 else kwargs.get("bias")


def bf16_context(device: torch.device, inner=None):
    """`inner` (an autocast context, or none), plus the emulation where this CPU needs it."""
    inner = inner if inner is not None else contextlib.nullcontext()
    if not emulates(device):
        return inner
    # Without this, inductor (train.compile) fuses x.to(bf16).float() into a no-op and the
    # rounding silently disappears (as for the fp16 emulation).
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True
    stack = contextlib.ExitStack()
    stack.enter_context(inner)
    stack.enter_context(BF16GemmEmulation())
    return stack
