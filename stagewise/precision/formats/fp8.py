"""FP8 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): formats, scaling, Float8Linear.

Convention: a *scale* multiplies before the cast and divides after it,

    x_fp8 = cast(clamp(x * scale, -max, max))        x ≈ x_fp8 / scale

so `torch._scaled_mm`, which multiplies its fp32 accumulator by the *dequantisation* factors,
receives 1 / scale. Values whose scaled magnitude exceeds the format's largest finite value
saturate to ±max (and ±inf becomes ±max) instead of becoming NaN/inf: this is what FP8
training recipes do (Transformer Engine, torchao), because one outlier must not poison a whole
matmul; NaN stays NaN so a genuinely broken step is still detected by the loss-scale/skip logic.
Rounding is the hardware's round-to-nearest-even (torch's cast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FP8Format:
    name: str
    dtype: torch.dtype
    max: float            # largest finite value
    min_subnormal: float  # smallest positive value; |x*scale| < min_subnormal/2 rounds to 0


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0 ** -9)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0 ** -16)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def fp8_format(fmt: str | FP8Format) -> FP8Format:
    if isinstance(fmt, FP8Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fp8 format {fmt!r}: valid are {sorted(FORMATS)}")
    return FORMATS[fmt]


def _as_scale(scale, device) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32, device=device)


def quantize_fp8(x: torch.Tensor, fmt: str | FP8Format, scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8, scale): x * scale saturated to ±max, then rounded to nearest-even fp8."""
    f = fp8_format(fmt)
    scale = _as_scale(scale, x.device)
    x_fp8 = (x.float() * scale).clamp(-f.max, f.max).to(f.dtype)
    return x_fp8, scale


def dequantize_fp8(x_fp8: torch.Tensor, scale, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() / _as_scale(scale, x_fp8.device)).to(dtype)


def fp8_cast_counts(x: torch.Tensor, x_fp8: torch.Tensor, scale,
                    fmt: str | FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(saturated, underflowed) element counts of one cast, as 0-d tensors (no host sync).

    saturated: |x * scale| > max (finite or inf) — clamped to ±max.
    underflowed: x != 0 but the fp8 value is 0 (|x * scale| below half the smallest subnormal).
    """
    f = fp8_format(fmt)
    xs = x.float() * _as_scale(scale, x.device)
    saturated = (xs.abs() > f.max).sum()
    underflowed = ((x != 0) & (x_fp8.float() == 0)).sum()
    return saturated, underflowed


# -- scaling strategies --------------------------------------------------------------------------

def _amax(x: torch.Tensor) -> torch.Tensor:
    # One pass, no |x| temporary; NaN propagates, so a broken tensor keeps the fallback scale.
    return torch.linalg.vector_norm(x.detach(), float("inf"), dtype=torch.float32)


def _scale_from_amax(amax: torch.Tensor, fmt: FP8Format, margin: int, power_of_two: bool,
                     fallback: torch.Tensor) -> torch.Tensor:
    """max / amax / 2^margin; a zero or non-finite amax keeps `fallback` (nothing to learn from it)."""
    scale = fmt.max / amax.clamp(min=torch.finfo(torch.float32).tiny) / (2.0 ** margin)
    if power_of_two:
        # Round *down* so amax * scale still fits; a power of two makes scaling exact in binary.
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    ok = torch.isfinite(amax) & (amax > 0) & torch.isfinite(scale)
    return torch.where(ok, scale, fallback)


class Scaler:
    """Chooses the scale of one tensor role (input, weight, grad) of one layer, call by call."""

    def __init__(self, fmt: str | FP8Format):
        self.fmt = fp8_format(fmt)
        self.last_amax: torch.Tensor | None = None
        self.last_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        amax = _amax(x)
        scale = self._scale(amax)
        self.last_amax, self.last_scale = amax, scale
        return scale

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoScaling(Scaler):
    """Scale 1: a plain (saturating) cast. Still records amax for telemetry."""

    def _scale(self, amax):
        return torch.ones((), dtype=torch.float32, device=amax.device)


class CurrentScaling(Scaler):
    """scale = max / amax(x) of this very tensor (per-tensor "dynamic"/"current" scaling)."""

    def __init__(self, fmt, *, margin: int = 0, power_of_two: bool = False):
        super().__init__(fmt)
        self.margin, self.power_of_two = margin, power_of_two

    def _scale(self, amax):
        one = torch.ones((), dtype=torch.float32, device=amax.device)
        return _scale_from_amax(amax, self.fmt, self.margin, self.power_of_two, one)


class DelayedScaling(Scaler):
    """scale = max / max(amax history of the previous `history_len` calls); then this call's amax is pushed.

    As Transformer Engine's and torchao's delayed scaling: the scale is known before the tensor
    is read (one fused cast, no extra reduction on the critical path), at the price of
    saturating when amax jumps above the history. The very first call has no history, so, as
    torchao, its scale comes from its own amax (a plain cast there could overflow). A zero or
    non-finite amax keeps the previous scale.
    """

    def __init__(self, fmt, history_len: int = 16, *, margin: int = 0, power_of_two: bool = False):
        super().__init__(fmt)
        if history_len < 1:
            raise ValueError(f"history_len {history_len}: must be >= 1")
        self.history_len, self.margin, self.power_of_two = history_len, margin, power_of_two
        self.history = torch.zeros(history_len)  # newest first; only the first `count` are real
        self.count = 0
        self._prev_scale = torch.ones(())

    def _scale(self, amax):
        if self.history.device != amax.device:
            self.history = self.history.to(amax.device)
            self._prev_scale = self._prev_scale.to(amax.device)
        past = self.history[: self.count].amax() if self.count else amax
        scale = _scale_from_amax(past, self.fmt, self.margin, self.power_of_two, self._prev_scale)
        self.history = torch.roll(self.history, 1)
        self.history[0] = amax
        self.count = min(self.count + 1, self.history_len)
        self._prev_scale = scale
        return scale

    def amax_history(self) -> list[float]:
        """Oldest first."""
        return [float(v) for v in self.history[: self.count].flip(0).tolist()]

    def state_dict(self) -> dict:
        return {"history_len": self.history_len, "amax_history": self.amax_history(),
                "scale": float(self._prev_scale)}

    def load_state_dict(self, state: dict) -> None:
        hist = [float(v) for v in state["amax_history"]][-self.history_len:]
        device = self.history.device
        self.history = torch.zeros(self.history_len, device=device)
        if hist:
            self.history[: len(hist)] = torch.tensor(hist[::-1], device=device)
        self.count = len(hist)
        self._prev_scale = torch.tensor(float(state.get("scale", 1.0)), device=device)


def make_scaler(kind: str, fmt, history_len: int = 16, **kw) -> Scaler:
    if kind == "current":
        return CurrentScaling(fmt, **kw)
    if kind == "delayed":
        return DelayedScaling(fmt, history_len, **kw)
    if kind == "none":
        return NoScaling(fmt)
    raise ValueError(f"fp8 scaling {kind!r}: valid are 'current', 'delayed', 'none'")


# -- the matmul ----------------------------------------------------------------------------------

BACKENDS = ("auto", "scaled_mm", "emulate")


def _fits_scaled_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    # cuBLASLt's FP8 GEMM (the CUDA kernel behind _scaled_mm) needs every dim a multiple of 16;
    # applied on every device so the choice of path does not depend on where the test ran.
    return all(d % 16 == 0 for d in (a.shape[0], a.shape[1], b.shape[1]))


def fp8_mm(a_fp8, a_scale, b_fp8, b_scale, out_dtype, backend: str = "auto") -> torch.Tensor:
    """(a_fp8 / a_scale) @ (b_fp8 / b_scale) with an fp32 accumulator, result in out_dtype.

    "scaled_mm": torch._scaled_mm when the shapes fit (else emulate); "emulate": upcast the fp8
    values to fp32 exactly, fp32 matmul, same scaling — numerically the same computation;
    "auto": scaled_mm on CUDA, emulate on CPU, where _scaled_mm is a reference kernel about a
    thousand times slower than an fp32 GEMM (measured: 74 s vs 0.09 s for 512x2048x2048 on 2
    cores, torch 2.13). On CPU _scaled_mm accepts any shape and layout; the rule above is CUDA's.
    """
    use = backend == "scaled_mm" or (backend == "auto" and a_fp8.device.type == "cuda")
    if use and _fits_scaled_mm(a_fp8, b_fp8):
        # Layout rules of the CUDA kernel: A row-major, B column-major.
        a = a_fp8.contiguous()
        b = b_fp8.t().contiguous().t()
        return torch._scaled_mm(a, b, scale_a=1.0 / a_scale, scale_b=1.0 / b_scale, out_dtype=out_dtype)
    return ((a_fp8.float() @ b_fp8.float()) * (1.0 / (a_scale * b_scale))).to(out_dtype)


def _cast(x, scaler: Scaler, mod: "Float8Linear", role: str):
    scale = scaler(x)
    f = scaler.fmt
    xs = x.float() * scale
    entry = {"amax": scaler.last_amax, "scale": scale}
    if mod.count_casts:
        # Same counts as fp8_cast_counts without a second cast: under round-to-nearest-even every
        # nonzero |x*scale| <= min_subnormal/2 becomes 0 (the tie goes to 0, the even neighbour).
        a = xs.abs()
        entry.update(saturated=(a > f.max).sum(), underflowed=((a <= f.min_subnormal / 2) & (a > 0)).sum(),
                     numel=x.numel())
    mod._tele[role] = entry
    return xs.clamp_(-f.max, f.max).to(f.dtype), scale


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T with x, W in e4m3; backward casts grad_out to e5m2 (the FP8 paper's hybrid recipe)."""

    @staticmethod
    def forward(ctx, x2d, weight, mod: "Float8Linear", out_dtype):
        with torch.autocast(x2d.device.type, enabled=False):
            x_fp8, sx = _cast(x2d, mod.input_scaler, mod, "input")
            w_fp8, sw = _cast(weight, mod.weight_scaler, mod, "weight")
            y = fp8_mm(x_fp8, sx, w_fp8.t(), sw, out_dtype, mod.backend)
        # Only the fp8 copies are kept for backward: half the activation memory of bf16.
        ctx.save_for_backward(x_fp8, sx, w_fp8, sw)
        ctx.mod, ctx.x_dtype, ctx.w_dtype = mod, x2d.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, sx, w_fp8, sw = ctx.saved_tensors
        mod = ctx.mod
        with torch.autocast(grad_out.device.type, enabled=False):
            g_fp8, sg = _cast(grad_out, mod.grad_scaler, mod, "grad")
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = fp8_mm(g_fp8, sg, w_fp8, sw, ctx.x_dtype, mod.backend)
            if ctx.needs_input_grad[1]:
                grad_w = fp8_mm(g_fp8.t(), sg, x_fp8, sx, ctx.w_dtype, mod.backend)
        return grad_x, grad_w, None, None


class Float8Linear(nn.Module):
    """An nn.Linear whose matmuls run in FP8; holds the *same* Parameter objects (master dtype).

    Forward: input and weight → e4m3 (each with its own scaler); backward: grad_output → e5m2;
    grad_input = g @ W, grad_weight = g^T @ x, all from the fp8 copies. The bias, if any, is
    added in the output dtype. The output dtype is autocast's when autocast is on, else the
    input's. Parameter names (weight, bias) match nn.Linear, so state dicts are unchanged.
    """

    def __init__(self, linear: nn.Linear, *, scaling: str = "current", history_len: int = 16,
                 backend: str = "auto", telemetry: bool = True, power_of_two: bool = False):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"fp8 backend {backend!r}: valid are {BACKENDS}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.backend, self.scaling = backend, scaling
        kw = {} if scaling == "none" else {"power_of_two": power_of_two}
        self.input_scaler = make_scaler(scaling, E4M3, history_len, **kw)
        self.weight_scaler = make_scaler(scaling, E4M3, history_len, **kw)
        self.grad_scaler = make_scaler(scaling, E5M2, history_len, **kw)
        # amax and scale of every cast are always kept (free); the saturated/underflowed counts cost
        # a few elementwise passes, so a precision mode may switch them on only on telemetry steps.
        self.count_casts = telemetry
        self._tele: dict[str, dict] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self, out_dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y

    def telemetry(self) -> dict[str, float]:
        """Flat {role.key: value} of the last forward/backward: amax, scale (+ saturated, underflowed, numel
        when count_casts). Reading it syncs with the device; call it on telemetry steps only."""
        out = {}
        for role, d in self._tele.items():
            for k, v in d.items():
                out[f"{role}.{k}"] = float(v)
        return out

    def scaler_state_dict(self) -> dict:
        return {r: getattr(self, f"{r}_scaler").state_dict() for r in ("input", "weight", "grad")}

    def load_scaler_state_dict(self, state: dict) -> None:
        for r in ("input", "weight", "grad"):
            getattr(self, f"{r}_scaler").load_state_dict(state.get(r, {}))

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scaling={self.scaling}, backend={self.backend}")
