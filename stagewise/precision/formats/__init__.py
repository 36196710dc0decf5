"""Numerics of low-precision training: FP8, block FP4, integer and ternary formats, Hadamard rotation.

Pure functions and small nn.Modules; the precision *modes* (stagewise/precision/) decide when
to use them. Every rule implemented, and where it comes from:

FP8 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning") — fp8.py
  e4m3 = torch.float8_e4m3fn (max 448, no inf), e5m2 = torch.float8_e5m2 (max 57344).
  x_fp8 = cast_rne(clamp(x * scale, -max, max)), x ≈ x_fp8 / scale: values beyond max (and ±inf)
  saturate to ±max rather than becoming NaN/inf, as training recipes do; NaN stays NaN.
  Scaling: CurrentScaling  scale = max / amax(x) now (optionally rounded down to a power of two);
           DelayedScaling  scale = max / max(amax of the previous N calls), then the current amax
                           is pushed (Transformer Engine / torchao); first call uses its own amax;
           NoScaling       scale = 1 (plain saturating cast).
  A zero or non-finite amax keeps the fallback scale (1, or the previous one for delayed).
  Float8Linear: forward x, W → e4m3; backward grad_out → e5m2 (the paper's hybrid recipe);
  fp32 accumulation via torch._scaled_mm or exact emulation (fp8 → fp32, fp32 matmul).

Block FP4 — blockfp4.py
  E2M1 grid {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, round to nearest, ties to even mantissa,
  saturating at ±6.
  MXFP4 (OCP Microscaling Formats spec v1.0): 32-blocks on the last dim, E8M0 scale
  2^(floor(log2(amax_block)) - 2), clamped to [2^-127, 2^127].
  NVFP4 (NVIDIA): 16-blocks; s_global = 448*6/amax_tensor (fp32), s_block =
  e4m3(amax_block/6 * s_global), q = e2m1(x * s_global / s_block), x̂ = q * s_block / s_global.
  Last dims that are not a multiple of the block are zero-padded (padding never changes amax).

Integer — intq.py
  int8 symmetric absmax/127 in [-127, 127], per tensor / per channel / per token;
  int4 symmetric absmax/7 in [-7, 7], per row or per group; round half to even.
  Ternary, BitNet b1.58 (Ma et al. 2024): s = mean|W|, W_q = clamp(round(W/s), -1, 1) * s;
  activations int8 absmax per token (fake_quant_int8_per_token).

Hadamard rotation (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024) — hadamard.py
  Orthonormal Sylvester H along the last dim, blockwise by the largest power of two dividing
  the dim; x W^T = (x H)(W H)^T.

QAT — fake_quant.py: straight-through estimator (identity gradient through the rounding),
QuantLinear with weight/act/grad formats, group size and optional Hadamard rotation.
swap.py: swap_linears / unswap replace nn.Linear modules by name from outside the model.
"""

from stagewise.precision.formats.blockfp4 import fake_quant_mxfp4, fake_quant_nvfp4, round_to_e2m1
from stagewise.precision.formats.fake_quant import FORMAT_NAMES, QuantLinear, fake_quant, quant_grad, ste
from stagewise.precision.formats.fp8 import (
    E4M3,
    E5M2,
    CurrentScaling,
    DelayedScaling,
    Float8Linear,
    FP8Format,
    NoScaling,
    Scaler,
    dequantize_fp8,
    fp8_cast_counts,
    fp8_format,
    fp8_mm,
    make_scaler,
    quantize_fp8,
)
from stagewise.precision.formats.hadamard import fwht, hadamard_block
from stagewise.precision.formats.intq import (
    fake_quant_int4,
    fake_quant_int8,
    fake_quant_int8_per_token,
    fake_quant_ternary,
)
from stagewise.precision.formats.swap import swap_linears, unswap

__all__ = [
    "FP8Format", "E4M3", "E5M2", "fp8_format", "quantize_fp8", "dequantize_fp8", "fp8_cast_counts", "fp8_mm",
    "Scaler", "CurrentScaling", "DelayedScaling", "NoScaling", "make_scaler", "Float8Linear",
    "round_to_e2m1", "fake_quant_mxfp4", "fake_quant_nvfp4",
    "fake_quant_int8", "fake_quant_int8_per_token", "fake_quant_int4", "fake_quant_ternary",
    "fwht", "hadamard_block",
    "FORMAT_NAMES", "fake_quant", "ste", "quant_grad", "QuantLinear",
    "swap_linears", "unswap",
]
