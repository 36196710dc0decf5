"""Block-wise quantized optimizer states (8-bit and 4-bit) and AdamW over them.

8-bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each moment is cut
into blocks of 256 values; a block stores its absolute maximum in fp32 and every value as the
index of the nearest entry of a *dynamic* map (Dettmers 2015: a sign, a run of zeros giving a
decimal exponent 10^-6 .. 10^0, and the remaining bits a linear fraction in [0.1, 1]). The map
is dense near zero, so small moments keep their relative precision; the per-block maximum is the
dynamic scaling that keeps one outlier from flattening the whole tensor. Adam's first moment uses
the signed map, the second (never negative) the unsigned one, which spends the sign bit on the
fraction. 2 bytes per parameter plus 8 per 256 values, instead of 8.

4-bit (Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"): blocks of 128; the
first moment on a 4-bit signed dynamic-exponent map (3 exponent bits); the second moment on a
linear map *without zero* (1/16 .. 1): the paper's zero-point problem — a second moment rounded to
zero makes m / sqrt(v) explode. Two codes per byte: 1 byte per parameter plus 8 per 128 values.

Tensors under 4096 values keep fp32 states (bitsandbytes' min_8bit_size): norms and biases are
too small to matter and too sensitive to quantize. Each step dequantizes a moment to fp32,
updates it and re-quantizes it (round to nearest), so the update itself is fp32 AdamW.
"""

from __future__ import annotations

import functools
import math

import torch

MIN_QUANTIZED_NUMEL = 4096
BLOCK = {8: 256, 4: 128}


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool, exponent_bits: int = 7, total_bits: int = 8) -> tuple[float, ...]:
    """The sorted values of the dynamic data type (Dettmers 2015, 'dynamic tree quantization'):
    for each decimal exponent 10^(i - exponent_bits + 1), the midpoints of a linear grid on
    [0.1, 1] with 2^(i + fraction bits) cells (twice as many without a sign), their negatives when
    signed, then 0 and 1; unsigned maps pad with zeros to 2^total_bits entries."""
    values: list[float] = []
    fraction_bits = total_bits - 1 - exponent_bits
    for i in range(exponent_bits):
        cells = 2 ** (i + fraction_bits + (0 if signed else 1))
        grid = torch.linspace(0.1, 1, cells + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        magnitude = 10 ** (i - exponent_bits + 1)
        values += (magnitude * mids).tolist()  # the product in fp32, as the reference maps round it
        if signed:
            values += (-magnitude * mids).tolist()
    if fraction_bits > 0:  # the all-zero exponent: one more run at the largest magnitude
        cells = 2 ** fraction_bits - 1
        grid = torch.linspace(0.1, 1, cells + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        values += (magnitude * mids).tolist()
        if signed:
            values += (-magnitude * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return tuple(sorted(torch.tensor(values, dtype=torch.float32).tolist()))


@functools.lru_cache(maxsize=None)
def _linear_no_zero_map(levels: int) -> tuple[float, ...]:
    return tuple(torch.linspace(0, 1, levels + 1, dtype=torch.float32)[1:].tolist())


def state_map(bits: int, signed: bool) -> torch.Tensor:
    """The code book of a moment: 8-bit dynamic (signed for m, unsigned for v); 4-bit dynamic
    exponent for m, linear without zero for v."""
    if bits == 8:
        return torch.tensor(dynamic_map(signed), dtype=torch.float32)
    return torch.tensor(dynamic_map(True, 3, 4) if signed else _linear_no_zero_map(16), dtype=torch.float32)


class BlockQuantizer:
    """Block-wise absmax scaling and round-to-nearest on a sorted code book."""

    def __init__(self, bits: int, signed: bool, device: torch.device):
        self.bits, self.block = bits, BLOCK[bits]
        self.code = state_map(bits, signed).to(device)
        self.bounds = (self.code[:-1] + self.code[1:]) / 2  # nearest entry = bucket between midpoints

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def quantize(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """Write x (fp32) into codes (uint8; 4-bit: two per byte) and absmax (fp32, per block)."""
        flat = x.reshape(-1)
        n, B = flat.numel(), self.block
        padded = torch.nn.functional.pad(flat, (0, self.blocks(n) * B - n)).view(-1, B)
        scale = padded.abs().amax(dim=1)
        absmax.copy_(scale)
        scaled = (padded * (1.0 / scale.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).reshape(-1)[:n]
        q = torch.bucketize(scaled, self.bounds).to(torch.uint8)
        if self.bits == 4:
            q = torch.nn.functional.pad(q, (0, q.numel() % 2))
            q = q[0::2] | (q[1::2] << 4)
        codes.copy_(q)

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
        n = math.prod(shape)
        q = codes
        if self.bits == 4:
            q = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)
        values = self.code[q[:n].long()]
        B = self.block
        values = torch.nn.functional.pad(values, (0, self.blocks(n) * B - n)).view(-1, B) * absmax.unsqueeze(1)
        return values.reshape(-1)[:n].view(shape)

    def empty(self, numel: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        nbytes = numel if self.bits == 8 else -(-numel // 2)
        return (torch.zeros(nbytes, dtype=torch.uint8, device=device),
                torch.zeros(self.blocks(numel), dtype=torch.float32, device=device))


def quantized_bytes(numel: int, bits: int) -> int:
    """Bytes of one moment of `numel` values as this module stores it (fp32 under the threshold)."""
    if bits == 32 or numel < MIN_QUANTIZED_NUMEL:
        return 4 * numel
    return (numel if bits == 8 else -(-numel // 2)) + 4 * -(-numel // BLOCK[bits])


class Moments:
    """Adam's two moments of one tensor, fp32 or block-quantized, behind one load/store pair:
    `load` returns fp32 tensors to update in place, `store` writes them back (a no-op for fp32).
    The state dict entries are exp_avg/exp_avg_sq (fp32) or *_codes/*_absmax (quantized)."""

    def __init__(self, bits: int, device: torch.device):
        self.bits = bits
        self.quant = {} if bits == 32 else {s: BlockQuantizer(bits, s, device) for s in (True, False)}

    def quantized(self, numel: int) -> bool:
        return self.bits != 32 and numel >= MIN_QUANTIZED_NUMEL

    def init(self, state: dict, like: torch.Tensor) -> None:
        if not self.quantized(like.numel()):
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
            return
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            state[f"{name}_codes"], state[f"{name}_absmax"] = self.quant[signed].empty(like.numel(), like.device)

    def load(self, state: dict, shape) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(self.quant[signed].dequantize(state[f"{name}_codes"], state[f"{name}_absmax"], shape)
                     for name, signed in (("exp_avg", True), ("exp_avg_sq", False)))

    def store(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if "exp_avg" in state:
            return
        for name, signed, x in (("exp_avg", True, m), ("exp_avg_sq", False, v)):
            self.quant[signed].quantize(x, state[f"{name}_codes"], state[f"{name}_absmax"])


def restore_code_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """torch's Optimizer.load_state_dict casts every state tensor of a floating-point parameter to the
    parameter's dtype; the quantized codes must stay uint8 (exactly representable, so nothing is lost)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if key.endswith("_codes") and torch.is_tensor(value) and value.dtype != torch.uint8:
                state[key] = value.to(torch.uint8)


class MomentsOptimizer(torch.optim.Optimizer):
    """An optimizer whose Adam moments are `Moments` of `self.bits` bits: one Moments (and its
    quantizers) per device, and uint8 codes kept uint8 through load_state_dict."""

    def __init__(self, params, defaults: dict, bits: int):
        super().__init__(params, defaults)
        self.bits = bits
        self._moments: dict = {}

    def _moments_for(self, device) -> Moments:
        if device not in self._moments:
            self._moments[device] = Moments(self.bits, device)
        return self._moments[device]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_code_dtypes(self)


class QuantizedAdamW(MomentsOptimizer):
    """AdamW (torch's update rule: decoupled decay first, then m_hat / (sqrt(v_hat) + eps)) with
    8- or 4-bit block-wise moments. State per parameter: step (a float tensor, as torch.optim.AdamW
    keeps it) and the moments (Moments)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 bits: int = 8):
        if bits not in (8, 4):
            raise ValueError(f"bits: expected 8 or 4, got {bits}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, bits)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, moments = self.state[p], self._moments_for(p.device)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    moments.init(state, p)
                state["step"] += 1
                t = state["step"].item()
                m, v = moments.load(state, p.shape)
                grad = p.grad.float()
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                moments.store(state, m, v)
                denom = (v.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(eps)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** t))
        return loss
