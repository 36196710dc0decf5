"""Packed storage for the frozen base weights of QLoRA-style fine-tuning: NF4, int8, int4.

Blocks of `block_size` (B) values run over the flattened weight (row-major, as in bitsandbytes),
the last one possibly short; each keeps its fp32 absmax (0 for an all-zero block, which dequantizes
to zeros).
  nf4   (QLoRA, Dettmers et al. 2023) x * (1 / absmax), clamped to [-1, 1], rounded to the nearest
        of the 16 NormalFloat4 values (bitsandbytes' table; a value exactly on a midpoint goes to
        the lower one, as bnb's bucketize on midpoints); x̂ = code * absmax.
  int8  q = round(x / absmax * 127) stored as int8;           x̂ = q * (absmax / 127)
  int4  q = round(x / absmax * 7) in [-7, 7], stored as q + 8; x̂ = q * (absmax / 7)
        (torch.round is half to even; the division by 127 or 7 is done once per block.)
4-bit codes go two per byte, the earlier element in the high nibble, an odd numel padding a zero
code: bit for bit bitsandbytes.functional.quantize_4bit(w, blocksize=B, quant_type="nf4").

double_quant (QLoRA §2 "Double Quantization", bnb's compress_statistics=True): absmax - mean(absmax)
is quantized again in blocks of 256 to the nearest of bnb's signed 8-bit dynamic map (same arithmetic
as above; bit for bit bnb's pure-torch backend), keeping one fp32 absmax per 256 blocks and the fp32
mean. bnb's native CPU kernel searches the map approximately (BinSearch "Direct2") and takes the
second-nearest code for ~0.1% of the absmax values, so there the two differ by one code step.

Bytes per parameter (fp32 is 4, bf16 2):
  nf4, int4   0.5 + 4/B                      B = 64: 0.5625
  int8        1   + 4/B                      B = 64: 1.0625
  double_quant replaces 4/B by 1/B + 4/(256 B), plus 4 B per tensor:  nf4 B = 64: ≈ 0.5159

Every buffer is non-persistent (checkpoints hold only trainable state; the base is rebuilt from
the pretrained weights) and of an integer dtype: fp32 statistics are kept as their int32 bit
patterns, because Module.to(dtype) / .half() cast floating buffers and a bf16 cast would re-round
every absmax. Device moves apply as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stagewise.errors import ConfigError

QUANT_KINDS = ("nf4", "int8", "int4")
DQ_BLOCK = 256  # bnb's block size for the second-level quantization of the absmax values
_QMAX = {"int8": 127, "int4": 7}

# bitsandbytes.functional.get_4bit_type("nf4"): create_normal_map(offset=0.9677083) as fp32
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_map() -> torch.Tensor:
    """bnb's create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted fp32
    values, 10^(i-6) times 2^i linear fractions in [0.1, 1] for i = 0..6, both signs, plus 0 and 1."""
    data = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (10 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / 2.0)
        data += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Constant tables cached per device (not buffers: no per-weight memory). "nf4"/"int4": packed byte
    -> its (high, low) nibbles' fp32 values as the bits of one int64; a 1-D index_select of 8-byte items
    is ~4x faster on CPU than rows of a [256, 2] table, ~15x faster than a 16-entry one by nibble."""
    key = (name, device)
    if key not in _TABLES:
        if name == "dynamic":
            t = dynamic_map()
        else:
            code = torch.tensor(NF4_VALUES) if name == "nf4" else torch.arange(-8.0, 8.0)
            t = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).view(torch.int64).view(-1)
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x flat, zero-padded to whole blocks, as [n_blocks, block]; absmax per block [n_blocks])."""
    xb = F.pad(x, (0, (-x.numel()) % block)).view(-1, block)
    return xb, xb.abs().amax(1)  # padding zeros never raise an absmax


def _nearest(xb: torch.Tensor, absmax: torch.Tensor, n: int, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted `code` value to x / absmax, first n values of xb [blocks, B]. bnb's
    arithmetic (quantize_4bit, pure-torch quantize_blockwise): reciprocal multiply for whole blocks, a
    division for a short last one, bucketize on fp32 midpoints (a value on one takes the lower code)."""
    scaled = xb * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if n % xb.shape[1]:
        scaled[-1] = xb[-1] / absmax[-1].clamp(min=1e-38)
    return torch.bucketize(scaled.clamp(-1, 1).view(-1)[:n], (code[:-1] + code[1:]) / 2)


def _scale_blocks_(out: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """out (flat, numel n) *= scale of its block, in place; the short last block on its own."""
    full = out.numel() - out.numel() % block
    out[:full].view(-1, block).mul_(scale[: full // block, None])
    if full < out.numel():
        out[full:].mul_(scale[-1])
    return out


class QuantizedWeight(torch.nn.Module):
    """A frozen weight packed as nf4 / int8 / int4 with per-block absmax; `dequantize()` rebuilds it."""

    def __init__(self, weight: torch.Tensor, kind: str, block_size: int = 64, double_quant: bool = False):
        super().__init__()
        if kind not in QUANT_KINDS:
            raise ConfigError(f"quantized base kind {kind!r}: expected one of {', '.join(QUANT_KINDS)}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"quantized base block_size {block_size!r}: expected a positive integer")
        if not weight.is_floating_point():
            raise ConfigError(f"quantized base weight has dtype {weight.dtype}: expected a floating dtype")
        self.shape, self.kind, self.block_size = weight.shape, kind, block_size
        self.double_quant = double_quant
        w = weight.detach().float().reshape(-1)
        n = w.numel()
        xb, absmax = _blocks(w, block_size)
        if kind == "nf4":
            q = _nearest(xb, absmax, n, torch.tensor(NF4_VALUES, device=w.device))
        else:
            qmax = _QMAX[kind]
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            q = torch.round(xb / safe[:, None] * qmax).clamp(-qmax, qmax).view(-1)[:n]
        if kind == "int8":
            codes = q.to(torch.int8)
        else:  # an odd numel pads the code of 0: 7 in the NF4 table, 0 + 8 for int4
            q = q if kind == "nf4" else q + 8
            q = F.pad(q, (0, n % 2), value=7 if kind == "nf4" else 8).to(torch.uint8)
            codes = q[0::2] << 4 | q[1::2]
        self.register_buffer("codes", codes, persistent=False)
        if double_quant:
            offset = absmax.mean()
            ab, absmax2 = _blocks(absmax - offset, DQ_BLOCK)
            codes2 = _nearest(ab, absmax2, absmax.numel(), _table("dynamic", w.device)).to(torch.uint8)
            self.register_buffer("absmax", codes2, persistent=False)
            self.register_buffer("absmax2", absmax2.view(torch.int32), persistent=False)
            self.register_buffer("offset", offset.reshape(1).view(torch.int32), persistent=False)
        else:
            self.register_buffer("absmax", absmax.view(torch.int32), persistent=False)

    def block_absmax(self) -> torch.Tensor:
        """fp32 absmax per block [n_blocks] (rebuilt from its 8-bit codes under double_quant)."""
        if not self.double_quant:
            return self.absmax.view(torch.float32)
        a = _table("dynamic", self.absmax.device).index_select(0, self.absmax.int())
        return _scale_blocks_(a, self.absmax2.view(torch.float32), DQ_BLOCK) + self.offset.view(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] rebuilt in fp32, cast to `dtype` at the end."""
        n = self.shape.numel()
        if self.kind == "int8":
            out = self.codes.float()
        else:
            pairs = _table(self.kind, self.codes.device).index_select(0, self.codes.int())
            out = pairs.view(torch.float32)[:n]
        scale = self.block_absmax()
        if self.kind in _QMAX:
            scale = scale / _QMAX[self.kind]
        return _scale_blocks_(out, scale, self.block_size).view(self.shape).to(dtype)

    def nbytes(self) -> int:
        """Bytes of all buffers: the memory the packed base really holds."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"{self.kind}, shape={tuple(self.shape)}, block_size={self.block_size}{dq}, "
                f"{8 * self.nbytes() / self.shape.numel():.3f} bits/param")
