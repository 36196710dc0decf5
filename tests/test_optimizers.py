"""The memory-efficient optimizers against their reference implementations, on the same gradients.

References: galore-torch (GaLore, GaLore 8-bit), fira (Fira), apollo-torch (APOLLO, APOLLO-Mini),
bitsandbytes' CPU AdamW8bit, torchao's 4-bit code books, torch.optim.Muon + torch.optim.AdamW;
and, for the quantized states, a reference written here from the papers' definition.
"""

import pytest
import torch

from stagewise.optim.muon import MuonWithAdamW
from stagewise.optim.projected import ProjectedAdamW
from stagewise.optim.quantized import BlockQuantizer, QuantizedAdamW, dynamic_map, quantized_bytes, state_map

LR, WD, STEPS, GAP = 1e-2, 0.1, 7, 3  # projector refreshes at steps 0, 3 and 6


def _params(shapes):
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(shapes, steps=STEPS):
    g = torch.Generator().manual_seed(2)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params


def _ours(kind, ps, rank, scale, scale_type="channel", bits=32, betas=(0.9, 0.999)):
    group = {"params": ps[:2], "weight_decay": WD, "rank": rank, "update_proj_gap": GAP, "side": "auto",
             "limiter": True, "kind": kind, "scale": scale, "scale_type": scale_type}
    return ProjectedAdamW([group, {"params": ps[2:], "weight_decay": WD}], lr=LR, betas=betas, eps=1e-8, bits=bits)


SHAPES = [(64, 48), (40, 96), (96,)]  # tall (right projection), wide (left), a vector (plain Adam)


@pytest.mark.parametrize("name", ["galore", "fira", "apollo", "apollo-mini"])
def test_projected_optimizers_equal_their_reference_bitwise(name):
    import apollo_torch
    import fira
    import galore_torch

    ours_p, ref_p, grads = _params(SHAPES), _params(SHAPES), _grads(SHAPES)
    rest = {"params": ref_p[2:]}
    if name == "galore":
        ref = galore_torch.GaLoreAdamW([{"params": ref_p[:2], "rank": 8, "update_proj_gap": GAP, "scale": 0.25,
                                         "proj_type": "std"}, rest], lr=LR, weight_decay=WD, eps=1e-8)
        ours = _ours("galore", ours_p, 8, 0.25)
    elif name == "fira":
        ref = fira.FiraAdamW([{"params": ref_p[:2], "rank": 8, "update_proj_gap": GAP, "alpha": 0.25,
                               "proj_type": "std"}, rest], lr=LR, weight_decay=WD, eps=1e-8)
        ours = _ours("fira", ours_p, 8, 0.25)
    else:
        mini = name == "apollo-mini"
        rank, scale, scale_type = (1, 128, "tensor") if mini else (8, 1, "channel")
        ref = apollo_torch.APOLLOAdamW([{"params": ref_p[:2], "rank": rank, "proj": "random", "scale_type": scale_type,
                                         "update_proj_gap": GAP, "scale": scale, "proj_type": "std"}, rest],
                                       lr=LR, weight_decay=WD, eps=1e-8)
        ours = _ours("apollo", ours_p, rank, float(scale), scale_type)
    start = [p.detach().clone() for p in ours_p]
    for a, b, p0 in zip(_run(ours, ours_p, grads), _run(ref, ref_p, grads), start):
        assert not a.equal(p0)
        assert a.equal(b)  # bit for bit, through three projector refreshes and the limiter
    # the moments live at the projected size
    assert ours.state[ours_p[0]]["exp_avg"].shape == ((64, 1) if name == "apollo-mini" else (64, 8))
    assert ours.state[ours_p[1]]["exp_avg"].shape == ((1, 96) if name == "apollo-mini" else (8, 96))


def test_galore_8bit_follows_galore_torch_8bit(monkeypatch):
    """GaLoreAdamW8bit runs bitsandbytes' 8-bit AdamW on the projected gradient. bitsandbytes' CPU
    quantizer (a C binary search) rounds a few values per thousand to the neighbouring code, so the
    trajectories agree to quantization noise, not bitwise: within 1% of the distance travelled, 3x
    closer than the fp32 GaLore's."""
    import galore_torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # the reference syncs a GPU unconditionally
    shapes = [(128, 100), (100, 160), (96,)]
    grads, start = _grads(shapes), _params(shapes)
    ours8, ref, ours32 = _params(shapes), _params(shapes), _params(shapes)
    _run(_ours("galore", ours8, 64, 0.25, bits=8, betas=(0.9, 0.95)), ours8, grads)
    _run(galore_torch.GaLoreAdamW8bit([{"params": ref[:2], "rank": 64, "update_proj_gap": GAP, "scale": 0.25,
                                        "proj_type": "std"}, {"params": ref[2:]}], lr=LR, weight_decay=WD,
                                      eps=1e-8, betas=(0.9, 0.95)), ref, grads)
    _run(_ours("galore", ours32, 64, 0.25, bits=32, betas=(0.9, 0.95)), ours32, grads)
    for a, b, c, z in zip(ours8[:2], ref[:2], ours32[:2], start[:2]):
        travelled = (b - z).norm()
        assert (a - b).norm() < 0.01 * travelled
        assert 3 * (a - b).norm() < (c - b).norm()


def test_dynamic_maps_equal_the_references():
    from bitsandbytes.functional import create_dynamic_map
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    assert torch.tensor(dynamic_map(True)).equal(create_dynamic_map(True))
    assert torch.tensor(dynamic_map(False)).equal(create_dynamic_map(False))
    assert state_map(4, True).equal(torch.tensor(get_qmap_signed()))
    assert state_map(4, False).equal(torch.tensor(get_qmap_unsigned()))


def _nearest_codes(x, code, block, midpoints=False):
    """The definition: scale each block by its absmax, take the nearest code book entry (argmin of the
    distance; midpoints: the entry whose decision interval between neighbouring midpoints holds the value,
    the same rounding up to values within an ulp of a midpoint)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)[:flat.numel()]
    if midpoints:
        return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2), absmax
    return (scaled.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1), absmax


@pytest.mark.parametrize("bits", [8, 4])
def test_block_quantizer_is_nearest_rounding_and_matches_bitsandbytes(bits):
    x = torch.randn(8192 + 100, generator=torch.Generator().manual_seed(0))
    for signed in (True, False):
        v = x if signed else x.abs()
        q = BlockQuantizer(bits, signed, torch.device("cpu"))
        codes, absmax = q.empty(v.numel(), "cpu")
        q.quantize(v, codes, absmax)
        expect, expect_absmax = _nearest_codes(v, q.code, q.block)
        unpacked = torch.stack([codes & 0xF, codes >> 4], 1).reshape(-1)[:v.numel()] if bits == 4 else codes
        assert torch.equal(unpacked.long(), expect) and torch.equal(absmax, expect_absmax)
        back = q.dequantize(codes, absmax, v.shape)
        assert torch.equal(back, (q.code[expect].view(-1) * expect_absmax.repeat_interleave(q.block)[:v.numel()]))
    if bits == 8:
        import bitsandbytes.functional as F

        ref_codes, state = F.quantize_blockwise(x, code=F.create_dynamic_map(True), blocksize=256)
        q = BlockQuantizer(8, True, torch.device("cpu"))
        codes, absmax = q.empty(x.numel(), "cpu")
        q.quantize(x, codes, absmax)
        assert torch.equal(absmax, state.absmax)
        differ = ref_codes.view(-1) != codes
        assert differ.float().mean() < 0.005  # bitsandbytes' C search misses the nearest code now and then
        assert (ref_codes.view(-1)[differ].int() - codes[differ].int()).abs().max() <= 1


def _reference_quantized_adamw(params, grads, bits, betas=(0.9, 0.95), eps=1e-8):
    """Block-wise quantized AdamW from the definition (Dettmers et al. 2022 / Li et al. 2023): dequantize,
    torch's AdamW update in fp32, re-quantize to the nearest code; tensors under 4096 values stay fp32."""
    block = 256 if bits == 8 else 128
    codes = {s: state_map(bits, s) for s in (True, False)}
    state = {}
    for t, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs):
            quant = p.numel() >= 4096
            m, v = state.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
            m = m.mul(betas[0]).add_(g, alpha=1 - betas[0])
            v = v.mul(betas[1]).addcmul_(g, g, value=1 - betas[1])
            with torch.no_grad():
                p.mul_(1 - LR * WD)
                p.addcdiv_(m, (v.sqrt() / (1 - betas[1] ** t) ** 0.5).add_(eps), value=-LR / (1 - betas[0] ** t))
            if quant:
                deq = []
                for x, signed in ((m, True), (v, False)):
                    idx, absmax = _nearest_codes(x, codes[signed], block, midpoints=True)
                    n = x.numel()
                    deq.append((codes[signed][idx] * absmax.repeat_interleave(block)[:n]).view(x.shape))
                m, v = deq
            state[id(p)] = (m, v)
    return params


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_adamw_equals_the_definition(bits):
    shapes = [(128, 64), (100, 50), (96,)]
    grads = _grads(shapes)
    ours, ref = _params(shapes), _params(shapes)
    _run(QuantizedAdamW(ours, lr=LR, weight_decay=WD, eps=1e-8, betas=(0.9, 0.95), bits=bits), ours, grads)
    _reference_quantized_adamw(ref, grads, bits)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adamw_8bit_follows_bitsandbytes():
    import bitsandbytes as bnb

    shapes = [(128, 64), (100, 50), (96,)]
    grads, start = _grads(shapes), _params(shapes)
    ours, ref, full = _params(shapes), _params(shapes), _params(shapes)
    _run(QuantizedAdamW(ours, lr=LR, weight_decay=WD, eps=1e-8, betas=(0.9, 0.95), bits=8), ours, grads)
    _run(bnb.optim.AdamW8bit(ref, lr=LR, weight_decay=WD, eps=1e-8, betas=(0.9, 0.95)), ref, grads)
    _run(torch.optim.AdamW(full, lr=LR, weight_decay=WD, eps=1e-8, betas=(0.9, 0.95)), full, grads)
    for a, b, c, z in zip(ours, ref, full, start):
        if a.numel() < 4096:  # fp32 states on both sides
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            continue
        assert (a - b).norm() < 0.01 * (b - z).norm()
        assert 3 * (a - b).norm() < (c - b).norm()


def test_quantized_state_bytes():
    opt = QuantizedAdamW(p := _params([(128, 64), (96,)]), lr=LR, bits=8)
    _run(opt, p, _grads([(128, 64), (96,)], 1))
    st = opt.state[p[0]]
    stored = sum(v.numel() * v.element_size() for k, v in st.items() if torch.is_tensor(v) and k != "step")
    assert stored == 2 * quantized_bytes(128 * 64, 8) == 2 * (8192 + 4 * 32)
    assert quantized_bytes(8192, 4) == 4096 + 4 * 64 and quantized_bytes(100, 8) == 400


def test_muon_with_adamw_equals_torch_muon_and_adamw_and_round_trips():
    shapes = [(64, 48), (40, 96), (96,), (50, 20)]
    grads = _grads(shapes)
    ours_p, a_p = _params(shapes), _params(shapes)
    kw = dict(lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, momentum=0.95, nesterov=True, ns_steps=5,
              adjust_lr_fn="match_rms_adamw", adamw_kwargs={"foreach": False})
    ours = MuonWithAdamW([{"params": ours_p[:2]}], [{"params": ours_p[2:3], "weight_decay": 0.0},
                                                    {"params": ours_p[3:]}], **kw)
    muon = torch.optim.Muon(a_p[:2], lr=LR, weight_decay=WD, momentum=0.95, nesterov=True, ns_steps=5,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": a_p[2:3], "weight_decay": 0.0}, {"params": a_p[3:]}], lr=LR,
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=WD, foreach=False)
    _run(ours, ours_p, grads[:3])
    for gs in grads[:3]:
        for p, g in zip(a_p, gs):
            p.grad = g.clone()
        muon.step()
        adamw.step()
    # a state_dict round trip (what a checkpoint does) keeps both halves linked to the shared state
    restored = MuonWithAdamW([{"params": ours_p[:2]}], [{"params": ours_p[2:3], "weight_decay": 0.0},
                                                        {"params": ours_p[3:]}], **kw)
    restored.load_state_dict(ours.state_dict())
    assert set(restored.state) == set(ours_p)
    _run(restored, ours_p, grads[3:])
    for gs in grads[3:]:
        for p, g in zip(a_p, gs):
            p.grad = g.clone()
        muon.step()
        adamw.step()
    for a, b in zip(ours_p, a_p):
        assert a.equal(b)
