"""The LoRA / DoRA layer that replaces a target nn.Linear, its base frozen and optionally packed.

    LoRA (Hu et al. 2021):  y = W x + b + s * B A drop(x),   s = alpha / r  (alpha / sqrt(r) with rslora)
    DoRA (Liu et al. 2024): y = W x + b + (m / n - 1) * W drop(x) + (m / n) * s * B A drop(x),
                            n = || W + s * B A ||_2 per output row, detached (the paper's section 4.3)

which is peft's arithmetic term for term (peft/tuners/lora/layer.py, dora.py), so a model and its
peft twin agree to rounding. A [r, in] and B [out, r] are fp32 Parameters; W and b keep their
parameter names (`weight`, `bias`) and are frozen. With a packed base (`pack_base`) `weight` is
replaced by a QuantizedWeight whose buffers are not in the state dict, dequantized in every forward
and again in backward (a custom autograd function), so no unpacked copy outlives one matmul.

Initialisations that move part of W into the adapter (PiSSA, OLoRA, LoRA-GA) leave the residual
W - s * B0 A0 as the frozen base and keep A0, B0 as buffers (`lora_A0`, `lora_B0`): checkpoints
hold them, so a resume rebuilds the same residual from the original base, and export-peft turns
the adapter back into a plain LoRA against the original W, as peft does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stagewise.precision.cpu_bf16 import emulates


class _PackedLinear(torch.autograd.Function):
    """x @ dequant(W)^T (+ b) for a frozen packed W: backward dequantizes W again instead of keeping
    the unpacked copy alive until then."""

    @staticmethod
    def forward(ctx, x, packed, bias):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.packed, ctx.x_dtype = packed, x.dtype
        return F.linear(x.to(dtype), packed.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        w = ctx.packed.dequantize(grad.dtype)
        slow = grad.dtype == torch.float16 or (grad.dtype == torch.bfloat16 and emulates(grad.device))
        if grad.device.type == "cpu" and slow:
            # Backward runs outside the forward's autocast / CPU bf16 emulation (precision/cpu_bf16.py),
            # and a bf16 or fp16 GEMM without a native kernel is ~80x slower than fp32 there: compute
            # it as the emulation does, an fp32 GEMM of the low-precision values rounded back once.
            return (grad.float() @ w.float()).to(ctx.x_dtype), None, None
        return (grad @ w).to(ctx.x_dtype), None, None


@torch.compiler.disable
def _packed_linear(x, packed, bias):
    """Outside torch.compile: traced, the dequantization's per-layer buffers made inductor recompile
    every block (46 s for the first step of a 2-layer model); as an opaque call it costs one graph
    break per adapted layer."""
    return _PackedLinear.apply(x, packed, bias)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.packed = None
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, device=device)) if dora else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.disabled = False  # adapters_disabled(): the layer as it was before training (a DPO reference)
        self.reset_lora("default")

    @property
    def dora(self) -> bool:
        return self.lora_magnitude is not None

    @property
    def moves_base(self) -> bool:
        """Whether the init moved part of W into the adapter (the base is the residual)."""
        return hasattr(self, "lora_A0")

    def extra_repr(self) -> str:
        base = f"packed={self.packed.kind}" if self.packed is not None else f"dtype={self.weight.dtype}"
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}, dora={self.dora}, {base}")

    # -- initialisation ----------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora(self, init: str = "default") -> None:
        """default: A as nn.Linear's Kaiming-uniform (a = sqrt(5)), peft's default; gaussian: A ~ N(0, 1/r).
        B = 0 in both, so the adapter starts as the identity change."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()
        self.init_magnitude()

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """DoRA's m = || W + s B A || per output row, so that the layer starts as the base."""
        if self.dora:
            self.lora_magnitude.copy_(self._weight_norm(self.base_weight(torch.float32)))

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor, moves_base: bool) -> None:
        """Start from the given factors; moves_base: they were taken out of W (the base becomes
        W - s * B A once `settle_base` runs) rather than added to it."""
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        if moves_base:
            self.register_buffer("lora_A0", A.detach().clone().float().contiguous())
            self.register_buffer("lora_B0", B.detach().clone().float().contiguous())

    def declare_moved_base(self) -> None:
        """Register empty A0/B0 buffers for a checkpoint to load into (resuming a PiSSA/OLoRA/LoRA-GA run)."""
        device = self.lora_A.device
        self.register_buffer("lora_A0", torch.zeros(self.r, self.in_features, device=device))
        self.register_buffer("lora_B0", torch.zeros(self.out_features, self.r, device=device))

    @torch.no_grad()
    def settle_base(self) -> None:
        """Subtract the moved part from the original W (fp32 arithmetic, peft's order) and re-derive
        DoRA's magnitude from the residual-plus-adapter. Run once, after A0/B0 are final."""
        if not self.moves_base:
            return
        w = self.weight.float() - self.scaling * (self.lora_B0 @ self.lora_A0)
        self.weight.copy_(w.to(self.weight.dtype))

    def pack_base(self, kind: str, block_size: int, double_quant: bool) -> None:
        """Replace the frozen weight by its packed form (nf4 / int8 / int4)."""
        from stagewise.adapters.quantized import QuantizedWeight

        self.packed = QuantizedWeight(self.weight.detach().float(), kind, block_size, double_quant)
        del self.weight
        self.weight = None

    def cast_base(self, dtype: torch.dtype) -> None:
        """Store the frozen weight in `dtype` (the compute dtype: autocast rounds it there anyway)."""
        if self.weight is not None and self.weight.dtype != dtype:
            self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)
            self.base_cast = True  # merging needs the original weight (merged_weight(original=...))

    # -- forward ---------------------------------------------------------------------------------

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen W (dequantized when packed), detached."""
        if self.packed is not None:
            return self.packed.dequantize(dtype or torch.float32)
        w = self.weight.detach()
        return w if dtype is None else w.to(dtype)

    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(w.float() + self.scaling * (self.lora_B.detach() @ self.lora_A.detach()), dim=1)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        w = self.weight
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # a base stored in the compute dtype, used outside autocast (sampling)
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.initial_forward(x)
        result = self._base(x)
        xd = self.dropout(x)
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B) * self.scaling
        if not self.dora:
            return result + lora
        scale = (self.lora_magnitude / self._weight_norm(self.base_weight()).detach()).to(result.dtype)
        if isinstance(self.dropout, nn.Identity):
            plain = result if self.bias is None else result - self.bias.to(result.dtype)
        else:
            plain = self._base(xd) if self.bias is None else self._base(xd) - self.bias.to(result.dtype)
        return result + (scale - 1) * plain + scale * lora.to(result.dtype)

    def initial_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer before training: the base, plus the part a base-moving init (pissa, olora, lora-ga)
        took out of W, s * B0 A0 (so that "adapters off" is the original layer, not the residual)."""
        result = self._base(x)
        if self.moves_base:
            result = result + (F.linear(F.linear(x, self.lora_A0.to(x.dtype)), self.lora_B0.to(x.dtype))
                               * self.scaling).to(result.dtype)
        return result

    def fused_head_operands(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h', W') with h' W'^T = this layer's output, for the fused loss on an adapted output head:
        h' = [h, s * A drop(h)], W' = [W, B]. None where that identity does not hold (DoRA, packed, bias)."""
        if self.dora or self.packed is not None or self.bias is not None:
            return None
        hx = F.linear(self.dropout(h), self.lora_A.to(h.dtype)) * self.scaling
        return torch.cat([h, hx.to(h.dtype)], -1), torch.cat([self.weight, self.lora_B.to(self.weight.dtype)], -1)

    # -- merging ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self, original: torch.Tensor | None = None) -> torch.Tensor:
        """W + s B A (DoRA: m / ||W + s B A|| * (W + s B A)) in fp32, W dequantized if packed.
        original: the base's weight before it was stored in the compute dtype (cast_base) — the merge
        is then against it (minus s B0 A0 for a base-moving init), as peft merges into the base."""
        if original is not None:
            base = original.float()
            if self.moves_base:
                base = base - self.scaling * (self.lora_B0 @ self.lora_A0)
        else:
            base = self.base_weight(torch.float32)
        w = base + self.scaling * (self.lora_B @ self.lora_A)
        if self.dora:
            w = w * (self.lora_magnitude / torch.linalg.norm(w, dim=1))[:, None]
        return w
