"""Packed frozen base weights (stagewise.adapters.quantized) against bitsandbytes and the definitions."""

import copy

import bitsandbytes.functional as BF
import pytest
import torch

from stagewise.adapters.quantized import NF4_VALUES, QuantizedWeight, dynamic_map
from stagewise.errors import ConfigError


def _weight(shape, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std


def _blocks_ref(w, block):
    """Reference blocks over the flattened weight: [n_blocks, block] zero-padded, and absmax per element."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block
    xb = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    return xb, xb.abs().amax(1).repeat_interleave(block)[: flat.numel()]


# ---- 1. NF4 against bitsandbytes -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 192), (300, 77), (7, 9)])  # 77*300 % 64 != 0; 63 is odd
def test_nf4_matches_bitsandbytes_bit_for_bit(shape):
    w = _weight(shape, seed=1)
    w[0, :3] = 0.0
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    qw = QuantizedWeight(w, "nf4")
    assert torch.equal(qw.codes, packed.view(-1))
    assert torch.equal(qw.block_absmax(), state.absmax)
    ref = BF.dequantize_4bit(packed, state)
    out = qw.dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-6
    assert torch.equal(qw.dequantize(torch.bfloat16), ref.to(torch.bfloat16))


def test_nf4_bf16_weight_matches_bitsandbytes():
    w = _weight((128, 64), seed=2).to(torch.bfloat16)
    packed, _ = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(QuantizedWeight(w, "nf4").codes, packed.view(-1))


# ---- 2. NF4 against the QLoRA definition ------------------------------------------------------

def test_nf4_values_from_normal_quantiles():
    # QLoRA appendix / bnb create_normal_map: 8 positive quantiles of N(0, 1) on [0.5, offset],
    # 7 negative ones, an exact zero, normalised by the largest; offset = mean(1 - 1/30, 1 - 1/32).
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    assert abs(offset - 0.9677083) < 1e-7
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    values = values / values.max()
    assert values.numel() == 16
    assert (values - torch.tensor(NF4_VALUES, dtype=torch.float64)).abs().max().item() < 1e-6


def test_nf4_nearest_code_on_hand_made_values():
    code = torch.tensor(NF4_VALUES)
    mid = (code[:-1] + code[1:]) / 2
    nudge = torch.nextafter(mid, torch.full_like(mid, 2.0))
    # absmax 1 (the first value) so x / absmax is x itself; -1 and +1 are the block's extremes
    block = torch.cat([torch.tensor([1.0, -1.0]), code, mid, nudge])
    block = torch.cat([block, torch.zeros(64 - block.numel())])
    idx = torch.arange(16)
    expected = torch.cat([torch.tensor([15, 0]), idx, idx[:-1], idx[1:], torch.full((64 - 48,), 7)])
    qw = QuantizedWeight(block.view(1, 64), "nf4")
    got = torch.stack([qw.codes >> 4, qw.codes & 15], 1).view(-1)
    assert torch.equal(got, expected.to(torch.uint8))  # exact codes stay, midpoints go down
    assert torch.equal(qw.dequantize().view(-1)[:18], torch.cat([torch.tensor([1.0, -1.0]), code]))
    scaled = QuantizedWeight(0.37 * block.view(1, 64), "nf4")  # absmax maps to +-1 at any scale
    assert torch.equal(scaled.dequantize().view(-1)[:2], torch.tensor([0.37, -0.37]))


# ---- 3. double quantisation --------------------------------------------------------------------

def test_double_quant_matches_bitsandbytes():
    w = _weight((1024, 1024), seed=3)
    qw = QuantizedWeight(w, "nf4", double_quant=True)
    packed, plain = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(qw.codes, packed.view(-1))
    absmax = plain.absmax
    dyn = BF.create_dynamic_map()
    assert torch.equal(dynamic_map(), dyn)

    # bit for bit with bnb's pure-torch quantize_blockwise (the "default" kernel, reached by skipping
    # the CPU one), its nearest-code search being the definition
    offset = absmax.mean()
    cpu_free = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    q2, a2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(cpu_free, absmax - offset, dyn, 256)
    assert torch.equal(qw.absmax, q2) and torch.equal(qw.absmax2.view(torch.float32), a2)
    ref_absmax = BF.dequantize_blockwise(q2, absmax=a2, code=dyn, blocksize=256) + offset
    assert torch.equal(qw.block_absmax(), ref_absmax)
    state = BF.QuantState(absmax=ref_absmax, shape=w.shape, dtype=w.dtype, blocksize=64, quant_type="nf4")
    ref = BF.dequantize_4bit(packed, state)
    assert (qw.dequantize() - ref).abs().max().item() <= 1e-6

    # bnb's own compress_statistics=True path on CPU: its native kernel searches the map
    # approximately, so a few absmax codes are one step off; bound: one map gap * absmax2 per block
    bnb_packed, nested = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(bnb_packed, packed) and torch.equal(nested.offset, offset)
    assert (qw.absmax == nested.absmax).float().mean().item() > 0.99
    bnb_absmax = BF.dequantize_blockwise(nested.absmax, nested.state2) + nested.offset
    gap = dyn.diff().max()
    per_block = gap * nested.state2.absmax.repeat_interleave(256)[: absmax.numel()]
    assert ((qw.block_absmax() - bnb_absmax).abs() <= per_block + 1e-7).all()  # + rounding of the offset add
    assert ((qw.block_absmax() - absmax).abs() <= (bnb_absmax - absmax).abs() + 1e-9).all()  # nearest
    diff = (qw.dequantize() - BF.dequantize_4bit(bnb_packed, nested)).abs()
    assert diff.max().item() <= per_block.max().item() + 1e-7

    assert qw.nbytes() < QuantizedWeight(w, "nf4").nbytes()
    n = w.numel()
    assert qw.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4


def test_double_quant_ragged_and_constant_absmax():
    w = _weight((300, 77), seed=4)  # 361 blocks: a short last block at both levels
    qw = QuantizedWeight(w, "nf4", double_quant=True)
    plain = QuantizedWeight(w, "nf4")
    assert (qw.block_absmax() - plain.block_absmax()).abs().max().item() < 1e-3
    for kind in ("int8", "int4"):  # double quantisation applies to any kind's absmax
        dq, plain = QuantizedWeight(w, kind, double_quant=True), QuantizedWeight(w, kind)
        assert torch.allclose(dq.block_absmax(), plain.block_absmax(), atol=1e-3)
        assert dq.nbytes() < plain.nbytes()
    const = torch.ones(4, 64)  # every absmax equals the mean: second-level absmax 0
    assert torch.equal(QuantizedWeight(const, "nf4", double_quant=True).dequantize(), const)


# ---- 4. int8 / int4 ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,qmax", [("int8", 127), ("int4", 7)])
def test_int_round_trip_error_bound(kind, qmax):
    w = _weight((100, 101), seed=5)  # 10100 % 64 != 0 and even; (3, 5) below is odd
    for weight in (w, w[:3, :5].contiguous()):
        _, absmax = _blocks_ref(weight, 64)
        err = (QuantizedWeight(weight, kind).dequantize() - weight).abs().reshape(-1)
        assert (err <= absmax / (2 * qmax) * (1 + 1e-5)).all()


@pytest.mark.parametrize("kind,qmax", [("int8", 127), ("int4", 7)])
def test_int_exact_on_grid_and_zero_block(kind, qmax):
    g = torch.Generator().manual_seed(6)
    n_blocks, block = 9, 64
    q = torch.randint(-qmax, qmax + 1, (n_blocks, block), generator=g).float()
    q[:, 5] = qmax * torch.where(torch.rand(n_blocks, generator=g) < 0.5, 1.0, -1.0)  # absmax = qmax * s
    s = torch.exp2(-torch.randint(3, 12, (n_blocks, 1), generator=g).float())  # exact steps
    grid = q * s
    grid[4] = 0.0  # an all-zero block
    w = grid.view(-1)[: n_blocks * block - 23].reshape(-1, 1)  # a short last block, odd numel
    out = QuantizedWeight(w, kind).dequantize()
    assert torch.equal(out, w)
    assert not torch.isnan(out).any()


def test_int4_packs_two_per_byte():
    w = torch.tensor([[7.0, -7.0, 0.0, 1.0, -3.0]])
    qw = QuantizedWeight(w, "int4", block_size=5)
    assert qw.codes.tolist() == [(15 << 4) | 1, (8 << 4) | 9, (5 << 4) | 8]


def test_zero_weight_nf4():
    z = torch.zeros(3, 100)
    for dq in (False, True):
        out = QuantizedWeight(z, "nf4", double_quant=dq).dequantize()
        assert torch.equal(out, z)


# ---- 5. memory, state dict, dtype casts ------------------------------------------------------

def test_nbytes_per_kind():
    w = _weight((1024, 1024), seed=7)
    n = w.numel()
    assert QuantizedWeight(w, "nf4").nbytes() == n // 2 + 4 * n // 64  # 0.5625 B/param vs 4 for fp32
    assert QuantizedWeight(w, "int4").nbytes() == n // 2 + 4 * n // 64
    assert QuantizedWeight(w, "int8").nbytes() == n + 4 * n // 64
    assert QuantizedWeight(torch.ones(3, 7), "nf4", block_size=16).nbytes() == 11 + 4 * 2


def test_buffers_not_in_state_dict_and_survive_dtype_casts():
    w = _weight((64, 96), seed=8)
    holder = torch.nn.Module()
    holder.bias = torch.nn.Parameter(torch.zeros(64))
    for kind in ("nf4", "int8", "int4"):
        holder.packed = QuantizedWeight(w, kind, double_quant=kind == "nf4")
        before = holder.packed.dequantize()
        assert list(holder.state_dict()) == ["bias"]
        for cast in (lambda m: m.to(torch.float64), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
            cast(holder)
            assert torch.equal(holder.packed.dequantize(), before)
            assert holder.bias.dtype != torch.float32
            holder.float()
        moved = copy.deepcopy(holder.packed).to("meta")  # device moves still apply
        assert all(b.device.type == "meta" for b in moved.buffers())


def test_bad_arguments_are_config_errors():
    w = torch.ones(4, 4)
    with pytest.raises(ConfigError, match="nf4, int8, int4"):
        QuantizedWeight(w, "fp4")
    with pytest.raises(ConfigError, match="block_size"):
        QuantizedWeight(w, "nf4", block_size=0)
    with pytest.raises(ConfigError, match="floating"):
        QuantizedWeight(w.long(), "int8")
