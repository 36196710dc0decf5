"""Low-precision formats, checked against independent references: torch's float8 casts, ml_dtypes
(float8_e4m3fn / e5m2, float4_e2m1fn, float8_e8m0fnu), BitNet's reference quantiser, the Sylvester
construction of the Hadamard matrix, and fp32 nn.Linear."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.precision.formats import (
    E4M3,
    E5M2,
    FORMAT_NAMES,
    CurrentScaling,
    DelayedScaling,
    Float8Linear,
    NoScaling,
    QuantLinear,
    dequantize_fp8,
    fake_quant,
    fake_quant_int4,
    fake_quant_int8,
    fake_quant_int8_per_token,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    fake_quant_ternary,
    fp8_cast_counts,
    fwht,
    hadamard_block,
    quant_grad,
    quantize_fp8,
    round_to_e2m1,
    ste,
    swap_linears,
    unswap,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: on a loaded 2-core machine OpenMP's wake-up (~10 ms per
    # parallel op) would dominate the file's run time, and nothing here depends on threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ml_dtypes():
    return pytest.importorskip("ml_dtypes")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- FP8 casts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_fp8_edge_values(fmt):
    tiny = fmt.min_subnormal
    x = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 2, tiny * 0.75, fmt.max, -fmt.max,
                      fmt.max * 1.01, -fmt.max * 4, float("inf"), float("-inf"), float("nan")])
    q, _ = quantize_fp8(x, fmt, 1.0)
    assert q.dtype == fmt.dtype
    back = q.float()
    expected = torch.tensor([0.0, -0.0, tiny, -tiny, 0.0, tiny, fmt.max, -fmt.max,
                             fmt.max, -fmt.max, fmt.max, -fmt.max, float("nan")])
    assert torch.equal(back[:-1], expected[:-1])
    assert torch.isnan(back[-1])
    assert torch.signbit(back[1]) and not torch.signbit(back[0])  # -0 keeps its sign
    # in-range values round exactly as torch's own cast does
    r = torch.randn(4096) * fmt.max / 8
    assert torch.equal(quantize_fp8(r, fmt, 1.0)[0].float(), r.to(fmt.dtype).float())


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_fp8_random_matches_ml_dtypes(fmt):
    ml = _ml_dtypes()
    ml_t = {"e4m3": ml.float8_e4m3fn, "e5m2": ml.float8_e5m2}[fmt.name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, generator=g) * torch.exp2(torch.randint(-20, 12, (8192,), generator=g).float())
    scale = torch.tensor(3.0)
    ours = dequantize_fp8(quantize_fp8(x, fmt, scale)[0], scale)
    # ml_dtypes turns out-of-range values into NaN; the saturating rule clips first
    ref = np.clip((x * scale).numpy(), -fmt.max, fmt.max).astype(ml_t).astype(np.float32) / np.float32(3.0)
    assert torch.equal(ours, torch.from_numpy(ref))


def test_fp8_cast_counts_known():
    # scale 2: 1e-4*2 < 2^-10 (half of e4m3's smallest subnormal) → 0; 300*2 > 448 → saturated
    x = torch.tensor([1e-4, -1e-4, 2e-4, 1.0, 300.0, -1000.0, 0.0, 0.5, 1e-3])
    q, s = quantize_fp8(x, E4M3, 2.0)
    sat, under = fp8_cast_counts(x, q, s, E4M3)
    assert (int(sat), int(under)) == (2, 3)
    assert q[4].float() == 448 and q[5].float() == -448


def test_float8linear_telemetry_counts_underflow():
    lin = nn.Linear(16, 16, bias=False)
    f = Float8Linear(lin, scaling="none", backend="emulate")
    x = torch.ones(16, 16)
    x[0, :3] = 1e-4          # below 2^-10 with scale 1: exactly 3 underflows
    x[1, 0] = 1000.0         # one saturation
    f(x).sum().backward()
    t = f.telemetry()
    assert t["input.underflowed"] == 3 and t["input.saturated"] == 1 and t["input.scale"] == 1.0
    assert t["input.amax"] == 1000.0
    assert {"weight.amax", "grad.scale", "grad.underflowed"} <= set(t)


def test_float8linear_counts_match_the_cast():
    # Float8Linear counts from x*scale without re-reading the cast; check against the e4m3 cast itself
    torch.manual_seed(0)
    tiny = E4M3.min_subnormal
    x = torch.cat([torch.randn(2000) * tiny, torch.tensor([tiny / 2, -tiny / 2, tiny * 0.5001, 0.0]),
                   torch.randn(1068) * E4M3.max]).reshape(48, 64)
    f = Float8Linear(nn.Linear(64, 16, bias=False), scaling="none", backend="emulate")
    f(x)
    q, s = quantize_fp8(x, E4M3, 1.0)
    sat, under = fp8_cast_counts(x, q, s, E4M3)
    t = f.telemetry()
    assert (t["input.saturated"], t["input.underflowed"]) == (int(sat), int(under))
    assert int(under) > 100 and int(sat) > 10
    f.count_casts = False
    f(x)
    assert set(f.telemetry()) == {"input.amax", "input.scale", "weight.amax", "weight.scale"}


def test_current_scaling():
    x = torch.tensor([0.5, -3.0, 1.0])
    assert CurrentScaling(E4M3)(x).item() == pytest.approx(448 / 3)
    assert CurrentScaling(E4M3, power_of_two=True)(x).item() == 128.0   # 2^floor(log2(149.3))
    assert CurrentScaling(E5M2)(torch.zeros(4)).item() == 1.0
    q, s = quantize_fp8(x, E4M3, CurrentScaling(E4M3)(x))
    assert q.float().abs().max() == 448


def test_delayed_scaling_history():
    sc = DelayedScaling(E4M3, history_len=3)
    amaxes = [1.0, 2.0, 8.0, 4.0, 0.5, 0.5, 0.5]
    # scale uses the max of the previous ≤3 amaxes; the first call uses its own amax
    expected_from = [1.0, 1.0, 2.0, 8.0, 8.0, 8.0, 4.0]
    histories = [[1], [1, 2], [1, 2, 8], [2, 8, 4], [8, 4, 0.5], [4, 0.5, 0.5], [0.5, 0.5, 0.5]]
    for a, e, h in zip(amaxes, expected_from, histories):
        s = sc(torch.tensor([a, -a / 2]))
        assert s.item() == pytest.approx(448 / e)
        assert sc.amax_history() == h
    # JSON round trip, and a restored scaler continues identically
    state = json.loads(json.dumps(sc.state_dict()))
    sc2 = DelayedScaling(E4M3, history_len=3)
    sc2.load_state_dict(state)
    for a in (16.0, 1.0):
        assert sc2(torch.tensor([a])).item() == sc(torch.tensor([a])).item()
    # an all-zero tensor keeps the previous scale instead of dividing by zero
    prev = sc(torch.tensor([1.0]))
    assert torch.isfinite(sc(torch.zeros(3)))
    assert NoScaling(E4M3)(torch.tensor([1e6])).item() == 1.0 and prev.item() > 0


# -- Float8Linear ----------------------------------------------------------------------------------

def _fwd_bwd(mod, x, g):
    x = x.clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    y = mod(x)
    y.backward(g)
    return y.detach(), x.grad, mod.weight.grad.clone(), mod.bias.grad.clone()


def test_float8linear_vs_fp32_reference():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    x, g = torch.randn(128, 256), torch.randn(128, 192)
    ref = _fwd_bwd(lin, x, g)
    f8 = Float8Linear(lin, backend="emulate")
    assert f8.weight is lin.weight and f8.bias is lin.bias
    assert set(f8.state_dict()) == set(lin.state_dict())
    out = _fwd_bwd(f8, x, g)
    errs = [_rel(o, r) for o, r in zip(out, ref)]
    # measured: y 0.037, grad_x 0.055, grad_w 0.057 (e4m3 ~ 2^-4, e5m2 ~ 2^-3 relative steps)
    assert errs[0] < 0.05 and errs[1] < 0.08 and errs[2] < 0.08
    assert errs[3] < 1e-6  # bias gradient never passes through fp8
    assert out[0].dtype == out[1].dtype == out[2].dtype == torch.float32


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_float8linear_scaled_mm_equals_emulate(scaling):
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    x, g = torch.randn(2, 16, 64), torch.randn(2, 16, 48)
    a = _fwd_bwd(Float8Linear(lin, backend="emulate", scaling=scaling), x, g)
    b = _fwd_bwd(Float8Linear(lin, backend="scaled_mm", scaling=scaling), x, g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    # the scalers' state is plain JSON (it goes into train_state.json)
    f8 = Float8Linear(lin, scaling=scaling)
    f8(x)
    state = json.loads(json.dumps(f8.scaler_state_dict()))
    f8b = Float8Linear(lin, scaling=scaling)
    f8b.load_scaler_state_dict(state)
    # restored, the next forward casts as the original's does; with delayed scaling that is with the
    # scale of x's history, so a 1000x smaller input comes out otherwise than from a fresh layer
    x2 = x * 1e-3
    with torch.no_grad():
        y_orig, y_restored, y_fresh = f8(x2), f8b(x2), Float8Linear(lin, scaling=scaling)(x2)
    assert torch.equal(y_restored, y_orig)
    assert torch.equal(y_fresh, y_orig) == (scaling == "current")
    # bf16 output under autocast: the two paths agree to bf16 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = Float8Linear(lin, backend="emulate")(x)
        yb = Float8Linear(lin, backend="scaled_mm")(x)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya, yb, rtol=1e-2, atol=1e-2)


def test_float8linear_odd_shapes_fall_back():
    torch.manual_seed(2)
    lin = nn.Linear(40, 24)
    x, g = torch.randn(7, 40), torch.randn(7, 24)
    a = _fwd_bwd(Float8Linear(lin, backend="emulate"), x, g)
    b = _fwd_bwd(Float8Linear(lin, backend="scaled_mm"), x, g)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="backend"):
        Float8Linear(lin, backend="cuda")


# -- FP4 -------------------------------------------------------------------------------------------

def test_e2m1_rounding_matches_ml_dtypes():
    ml = _ml_dtypes()
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    vals = np.concatenate([grid, mids, mids + 1e-3, mids - 1e-3, [6.5, 7, 100, 1e-8],
                           np.random.default_rng(0).uniform(0, 8, 2000).astype(np.float32)])
    vals = np.concatenate([vals, -vals]).astype(np.float32)
    ref = vals.astype(ml.float4_e2m1fn).astype(np.float32)
    ours = round_to_e2m1(torch.from_numpy(vals)).numpy()
    np.testing.assert_array_equal(ours, ref)


def _blocks_np(x, block):
    n = x.shape[-1]
    pad = (-n) % block
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return xp.reshape(*xp.shape[:-1], -1, block), n


def test_mxfp4_matches_reference():
    ml = _ml_dtypes()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 80)) * np.exp2(rng.integers(-8, 8, (6, 1)))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    xb, n = _blocks_np(x, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        scale = np.where(amax > 0, np.exp2(np.floor(np.log2(amax)) - 2), 2.0 ** -127).astype(np.float32)
    # the shared scale is an E8M0 value
    np.testing.assert_array_equal(scale.astype(ml.float8_e8m0fnu).astype(np.float32), scale)
    ref = ((xb / scale).astype(ml.float4_e2m1fn).astype(np.float32) * scale).reshape(6, -1)[:, :n]
    ours = fake_quant_mxfp4(torch.from_numpy(x))
    assert ours.shape == x.shape and ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), ref)
    # bf16 input → bf16 output, same values (E2M1 x 2^k is exact in bf16)
    xbf = torch.from_numpy(x).bfloat16()
    assert fake_quant_mxfp4(xbf).dtype == torch.bfloat16
    torch.testing.assert_close(fake_quant_mxfp4(xbf).float(), fake_quant_mxfp4(xbf.float()), rtol=0, atol=0)


def test_nvfp4_matches_reference():
    ml = _ml_dtypes()
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 56)) * np.exp2(rng.integers(-6, 6, (4, 1)))).astype(np.float32)
    xb, n = _blocks_np(x, 16)
    s_global = np.float32(448 * 6) / np.abs(x).max()
    block_dec = np.minimum(np.abs(xb).max(-1, keepdims=True) / np.float32(6) * s_global, np.float32(448))
    s_block = block_dec.astype(ml.float8_e4m3fn).astype(np.float32)
    q = (xb * (s_global / s_block)).astype(ml.float4_e2m1fn).astype(np.float32)
    ref = (q * (s_block / s_global)).reshape(4, -1)[:, :n]
    ours = fake_quant_nvfp4(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=0)
    assert _rel(ours, torch.from_numpy(x)) < 0.15


# -- integer and ternary ---------------------------------------------------------------------------

def test_int8_per_tensor_and_channel():
    x = torch.tensor([[127.0, 1.4, -0.5, 0.6], [254.0, -127.0, 1.0, 3.0]])
    # per tensor: scale 2; ties round to even (-0.25 → -0, 0.5 → 0, 1.5 → 2, -63.5 → -64)
    assert torch.equal(fake_quant_int8(x), torch.tensor([[128.0, 2, -0.0, 0], [254, -128, 0, 4]]))
    per_row = fake_quant_int8(x, dim=0)      # row scales 1 and 2
    assert torch.equal(per_row, torch.tensor([[127.0, 1, -0.0, 1], [254, -128, 0, 4]]))


def test_int8_per_token_matches_bitnet_reference():
    def bitnet_activation_quant(x):  # from the BitNet b1.58 training tips (Ma et al. 2024)
        scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        return (x * scale).round().clamp_(-128, 127) / scale

    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(fake_quant_int8_per_token(x), bitnet_activation_quant(x), rtol=1e-6, atol=1e-7)


def test_ternary_matches_bitnet_reference():
    def bitnet_weight_quant(w):
        scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
        return (w * scale).round().clamp_(-1, 1) / scale

    w = torch.tensor([[0.1, -2.0, 0.5, 0.0]])   # mean|w| = 0.65
    assert torch.allclose(fake_quant_ternary(w), torch.tensor([[0.0, -0.65, 0.65, 0.0]]))
    w = torch.randn(32, 48)
    torch.testing.assert_close(fake_quant_ternary(w), bitnet_weight_quant(w), rtol=1e-6, atol=1e-7)
    assert fake_quant_ternary(w).unique().numel() == 3


@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
def test_int4_grid(group_size):
    torch.manual_seed(0)
    w = torch.randn(8, 200)
    q = fake_quant_int4(w, group_size)
    assert q.shape == w.shape
    gs = group_size or 200
    pad = (-200) % gs
    qg = torch.nn.functional.pad(q, (0, pad)).reshape(8, -1, gs)
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(8, -1, gs)
    s = wg.abs().amax(-1, keepdim=True) / 7
    codes = qg / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.abs().max() <= 7 + 1e-4 and (codes.abs().amax(-1) > 6.99).all()   # absmax hits ±7
    assert (q - w).abs().max() <= (s.max() / 2) + 1e-6


# -- Hadamard --------------------------------------------------------------------------------------

def _sylvester(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_hadamard_power_of_two(n):
    h = fwht(torch.eye(n))  # the matrix the rotation multiplies by
    torch.testing.assert_close(h, _sylvester(n))
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-6, rtol=0)
    x = torch.randn(3, 4, n)
    torch.testing.assert_close(fwht(x), x @ h, atol=1e-5, rtol=1e-5)


def test_hadamard_blockwise_and_rotated_matmul():
    assert hadamard_block(96) == 32 and hadamard_block(7) == 1
    h = fwht(torch.eye(96))
    torch.testing.assert_close(h, torch.block_diag(*[_sylvester(32)] * 3))
    torch.testing.assert_close(h @ h.T, torch.eye(96), atol=1e-6, rtol=0)
    x, w = torch.randn(10, 96, dtype=torch.float64), torch.randn(24, 96, dtype=torch.float64)
    torch.testing.assert_close(fwht(x) @ fwht(w).T, x @ w.T, atol=1e-10, rtol=1e-10)
    assert fwht(x.float().bfloat16()).dtype == torch.bfloat16


# -- straight-through QAT --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_ste_gradient_is_identity(fmt):
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    y = ste(x, fmt, group_size=32)
    assert not torch.equal(y, x)          # it did round
    y.backward(g)
    assert torch.equal(x.grad, g)
    # quant_grad: identity forward, rounded gradient backward
    x.grad = None
    quant_grad(x * 1, fmt, 32).backward(g)
    assert torch.equal(x.grad, fake_quant(g, fmt, 32))


def test_fake_quant_telemetry_known():
    stats = {}
    x = torch.tensor([[127.0, 0.3, 0.6, -0.2, 0.0, 1.0, 2.0, 3.0]])   # int8 per row: scale 1
    fake_quant(x, "int8", stats=stats)
    assert stats["underflow"].item() == pytest.approx(2 / 8) and stats["clipped"].item() == 0
    stats = {}
    fake_quant(torch.tensor([[0.1, -2.0, 0.5, 0.0]]), "ternary", stats=stats)   # -2/0.65 clipped to -1
    assert stats["clipped"].item() == pytest.approx(1 / 4) and stats["underflow"].item() == pytest.approx(1 / 4)
    stats = {}
    x = torch.full((1, 32), 1.0)
    x[0, 0] = 7.5                                   # MX scale 2^(2-2)=1: 7.5 saturates to 6
    x[0, 1] = 0.2                                   # rounds to 0
    fake_quant(x, "mxfp4", stats=stats)
    assert stats["clipped"].item() == pytest.approx(1 / 32) and stats["underflow"].item() == pytest.approx(1 / 32)


def _regression(make, steps=30, lr=0.05):
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    target = x @ (torch.randn(32, 64) / 8).T
    lin = nn.Linear(64, 32)
    mod = make(lin)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (mod(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, mod


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_quantlinear_trains(fmt):
    act = "int8" if fmt == "ternary" else fmt         # BitNet: ternary weights, int8 activations
    losses, mod = _regression(lambda lin: QuantLinear(lin, weight_format=fmt, act_format=act, grad_format=act,
                                                      group_size=32, hadamard=fmt in ("int4", "mxfp4")))
    assert losses[-1] < 0.5 * losses[0], losses
    t = mod.telemetry()
    assert {"weight.underflow", "weight.clipped", "act.underflow", "grad.clipped"} <= set(t)
    assert all(0 <= v <= 1 for v in t.values())
    mod.count_stats, mod._tele = False, {}
    mod(torch.randn(2, 64)).sum().backward()
    assert mod.telemetry() == {}


def test_quantlinear_shares_parameters_and_validates():
    lin = nn.Linear(8, 4)
    q = QuantLinear(lin, weight_format="int4")
    assert q.weight is lin.weight and set(q.state_dict()) == set(lin.state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(QuantLinear(lin)(x), lin(x))          # no formats: the same layer
    torch.testing.assert_close(QuantLinear(lin, hadamard=True)(x), lin(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="weight_format 'fp3'"):
        QuantLinear(lin, weight_format="fp3")


def test_swap_and_unswap():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 16),
                           "blocks": nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)),
                           "head": nn.Linear(16, 10)})
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(4, 16)

    def run(m):
        return m["head"](m["blocks"](x))

    ref = run(model)
    names = swap_linears(model, lambda name, lin: Float8Linear(lin, backend="emulate"),
                         skip=lambda name: name == "head")
    assert names == ["blocks.0", "blocks.2"]
    assert isinstance(model["blocks"][0], Float8Linear) and isinstance(model["head"], nn.Linear)
    assert {n: p for n, p in model.named_parameters()} == params     # same names, same objects
    assert _rel(run(model).detach(), ref.detach()) < 0.1
    assert swap_linears(model, lambda name, lin: None) == []
    assert unswap(model) == ["blocks.0", "blocks.2"]
    assert type(model["blocks"][0]) is nn.Linear and model["blocks"][0].weight is params["blocks.0.weight"]
    torch.testing.assert_close(run(model), ref)
