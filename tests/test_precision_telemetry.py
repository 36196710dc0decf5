"""Precision telemetry on cases with known answers: activation-gradient underflow (the gradient lost at
the logits, before any weight gradient exists) and the lost-update fraction / drift of pure bf16 with
round-to-nearest, stochastic rounding and Kahan compensation."""

import math

import pytest
import torch

from stagewise.config.schema import LossScaleConfig
from stagewise.objectives import OBJECTIVES, Batch, ObjectiveOutput, causal_lm_loss
from stagewise.precision import CompensatedAdamW
from stagewise.precision.act_grads import _rescale
from stagewise.precision.telemetry import SAMPLE, GradFormatStats, LostUpdate, sample
from stagewise.train.step import train_step
from test_precision import _batches, _tiny  # the same tiny model and batches

CPU = torch.device("cpu")
FP16_FLUSH = 2.0**-25  # |x| <= half the smallest fp16 subnormal rounds to 0
UNSCALED = LossScaleConfig(init_scale=1.0, min_scale=1.0, max_scale=1.0)
TINY_LOSS = 1e-6



def _tiny_loss(model, batch):
    """The user's case: the loss multiplied by 1e-6, so that its gradients sit below fp16's range."""
    out = causal_lm_loss(model, batch)
    return ObjectiveOutput(out.loss_sum * TINY_LOSS, out.normaliser)


# --- the counting rules, on hand-built tensors ----------------------------------------------


def test_lost_counts_zeros_over_the_reference_support():
    g = torch.tensor([0.0, 1e-8, 0.0, 1.0, 0.0, 2.0**-20])
    support = torch.tensor([False, True, True, True, False, True])
    s = GradFormatStats(torch.float16)
    s.add("x", g, support)
    out = s.summary("act_grad", per_layer=True)
    # lost: in the support and zero in fp16 -- 1e-8 (flushed here) and the exact 0 (lost upstream)
    assert out["act_grad_lost_frac"] == 2 / 4
    assert out["act_grad_flushed_frac"] == 1 / 6 and out["act_grad_subnormal_frac"] == 1 / 6
    assert out["act_grad_layers"]["x"] == {"sampled": 6, "flushed_frac": 1 / 6, "subnormal_frac": 1 / 6,
                                           "lost_frac": 0.5}
    s.add("y", torch.ones(4), torch.ones(4, dtype=torch.bool))
    out = s.summary("act_grad", per_layer=True)
    assert out["act_grad_lost_frac"] == 2 / 8 and out["act_grad_worst_layer"] == "x"
    assert out["act_grad_worst_layer_frac"] == 0.5
    # Without a reference the keys are the weight-gradient ones, unchanged.
    w = GradFormatStats(torch.float16)
    w.add("w", g)
    assert "grad_lost_frac" not in w.summary() and w.summary()["grad_worst_layer_frac"] == 2 / 6


def test_reference_rescale_is_an_exact_power_of_two():
    g = torch.tensor([3e-9, -1e-12, 0.0, float("inf")])
    r = _rescale(g)
    k = r[0] / g[0]
    assert 2.0**7 <= float(r[0]) < 2.0**8  # the largest finite element
    assert math.log2(float(k)) == int(math.log2(float(k)))
    assert float(r[1]) == float(g[1]) * float(k) and r[2] == 0 and torch.isinf(r[3])
    assert torch.equal(_rescale(torch.zeros(3)), torch.zeros(3))
    h = torch.tensor([300.0, 1.0], dtype=torch.float16)
    assert _rescale(h).dtype == torch.float16 and float(_rescale(h)[0]) == 150.0


# --- fp16: the gradient lost at the logits ----------------------------------------------------


def _reference_logits_flush(scale: float) -> float:
    """Independent of the telemetry: the fp32 model's logits gradient of the 1e-6 loss, times S,
    on the same strided sample the probe takes; the fraction of its nonzero elements fp16 flushes."""
    model, prec, _ = _tiny("fp32", telemetry_every=0)
    model.fused_loss = False  # materialise the logits, as fp16-mixed does
    grads = []

    def keep_logits_grad(module, args, out):
        out.register_hook(grads.append)

    model.output.register_forward_hook(keep_logits_grad)
    batch = _batches(1)[0]
    loss = _tiny_loss(model, batch).loss_sum / int(batch.targets.numel())
    loss.backward()
    g = sample(grads[0]) * scale
    nz = g != 0
    return float((nz & (g.abs() <= FP16_FLUSH)).sum() / nz.sum())


def _fp16_step(loss_scale: LossScaleConfig, path: str = "emulated") -> tuple[dict, torch.nn.Module]:
    model, prec, opt = _tiny("fp16-mixed", telemetry_every=1, loss_scale=loss_scale)
    if path == "autocast":  # the CUDA path (torch.autocast fp16, fp16 logits), run on the CPU
        prec.emulate, prec.compute_dtype = False, torch.float16
    train_step(model, opt, prec, _tiny_loss, _batches(1), 1e-2, 1.0)
    return prec.metrics(), model


@pytest.mark.parametrize("path", ["emulated", "autocast"])
def test_fp16_activation_telemetry_reads_the_underflow_weight_gradients_cannot_see(path):
    # Without loss scaling every logits gradient is below 2^-25 (max |softmax - onehot| * 1e-6 / 64
    # tokens = 1.6e-8), so fp16 flushes all of them and every gradient below is an exact zero.
    assert _reference_logits_flush(1.0) == 1.0
    m, model = _fp16_step(UNSCALED, path)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing trains
    assert m["grad_flushed_frac"] + m["grad_subnormal_frac"] == 0.0  # the weight-gradient number misses it
    layers = m["act_grad_layers"]
    assert set(layers) == {"logits", "head_input", "layers.1", "layers.0"}
    assert layers["logits"]["flushed_frac"] == 1.0  # flushed where it happens...
    assert layers["layers.0"]["flushed_frac"] == 0.0  # ...and below only exact zeros,
    assert all(v["lost_frac"] == 1.0 for v in layers.values())  # which lost counts
    assert m["act_grad_lost_frac"] == 1.0 and m["act_grad_worst_layer_frac"] == 1.0
    assert m["act_grad_sampled"] == SAMPLE + 3 * 2048  # logits: 64 x 128 sampled; d = 32: 64 x 32 each


@pytest.mark.parametrize("path", ["emulated", "autocast"])
def test_fp16_activation_telemetry_with_loss_scaling_matches_an_fp32_reference(path):
    scale = 2.0**16  # the dynamic scaler's initial scale
    m, model = _fp16_step(LossScaleConfig(init_scale=scale), path)
    assert m["loss_scale"] == scale
    ref = _reference_logits_flush(scale)
    assert ref < 0.01
    assert m["act_grad_layers"]["logits"]["lost_frac"] == pytest.approx(ref, abs=2e-3)
    assert m["act_grad_lost_frac"] < 0.01
    assert all(v["lost_frac"] < 0.01 for v in m["act_grad_layers"].values())


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-mixed", "bf16-pure", "int8", "fp8"])
def test_activation_probes_change_no_number_and_leave_no_hook(mode):
    """Telemetry on every step vs off: same losses and weights bit for bit (two micro-batches)."""
    runs = []
    for every in (0, 1):
        model, prec, opt = _tiny(mode, telemetry_every=every)
        losses = [train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(2, seed=s), 1e-2, 1.0).host().loss
                  for s in range(2)]
        runs.append((losses, [t.clone() for t in model.state_dict().values()], prec.metrics()))
        assert not any(mod._forward_hooks for mod in model.modules())
    (la, wa, _), (lb, wb, m) = runs
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    assert m["act_grad_sampled"] > 0
    # fp8 and fake-quant modes have no reference pass (their backward keeps state): no lost fraction.
    assert ("act_grad_lost_frac" in m) == (mode in ("fp16-mixed", "bf16-mixed", "bf16-pure"))
    if "act_grad_lost_frac" in m:
        assert m["act_grad_lost_frac"] == 0.0  # a normal loss: nothing underflows here


@pytest.mark.slow
def test_activation_telemetry_with_compiled_blocks():
    """Hooks sit on the compiled block wrappers, outside the graphs; telemetry steps run the blocks
    eagerly (a compiled backward cannot run twice), so nothing recompiles and no graph breaks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for compiled in (False, True):
        model, prec, opt = _tiny("fp16-mixed", telemetry_every=2, loss_scale=UNSCALED)
        model.compile_blocks(compiled)
        losses[compiled] = []
        for s in range(4):
            r = train_step(model, opt, prec, _tiny_loss, _batches(1, seed=s), 1e-2, 1.0).host()
            losses[compiled].append(r.loss)
            if s in (1, 3):
                assert prec.metrics()["act_grad_lost_frac"] == 1.0
        graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 and not counters["graph_break"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# --- lost updates and the Kahan pair ---------------------------------------------------------


def test_lost_update_along_known_answers():
    before, u = torch.ones(4), torch.full((4,), 2.0**-10)
    for after, frac, along in ((before, 1.0, 1.0), (before + u, 0.0, 0.0), (before + u / 2, 0.5, 0.5),
                               (before + 2 * u, 1.0, -1.0)):
        lu = LostUpdate()
        lu.add(before, after, u)
        assert (lu.value(), lu.along()) == pytest.approx((frac, along), abs=1e-12)
    assert LostUpdate().along() is None


U = float(torch.tensor(1e-4, dtype=torch.float32))  # the fp32 update each step below (lr 1e-4, g = -1)


def _ones(n: int, steps: int, **flags):
    """Weights 1.0 and a constant update of 1e-4 (AdamW with betas 0 and g = -1 steps by exactly lr);
    yields (lost_update_frac, lost_update_along_frac, w, c) after every step."""
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p], lr=1e-4, betas=(0.0, 0.0), weight_decay=0.0, eps=1e-12, **flags)
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)
        opt.lost = LostUpdate()
        opt.step()
        c = opt.state[p].get("compensation")
        yield opt.lost.value(), opt.lost.along(), p.detach().double(), None if c is None else c.double()


def test_lost_update_follows_the_effective_weight():
    # Round to nearest: 1e-4 is below half an ulp of 1.0 (2^-8); every update is lost, w never moves.
    for frac, along, w, _ in _ones(4, 50):
        assert frac == 1.0 and along == 1.0 and w.eq(1.0).all()
    # Kahan: the effective weight w + c moves by t - w - c up to the bf16 rounding of c.
    rows = list(_ones(4, 38, kahan=True))
    c1 = float(torch.tensor(float(torch.tensor(1.0) + U) - 1.0).to(torch.bfloat16))  # fp32 t - w, stored bf16
    assert rows[0][0] == pytest.approx(abs(c1 - U) / U, rel=1e-9)
    # Step 38 is the first where w moves (by one ulp, 2^-7); the old measurement, (w' - w - u) / u,
    # read 77.1 there. The pair moves by (1 + 2^-7 + c38) - (1 + c37) with these stored values:
    c37, c38 = float(rows[36][3][0]), float(rows[37][3][0])
    assert (c37, c38) == (0.003814697265625, -0.0038909912109375) and float(rows[37][2][0]) == 1 + 2.0**-7
    assert rows[37][0] == pytest.approx(abs((2.0**-7 + c38 - c37) - U) / U, rel=1e-9)
    assert rows[37][0] == pytest.approx(0.0681, abs=1e-4)
    # Stochastic rounding lands 0 or one ulp (2^-7) with P(up) = u / ulp: unbiased, so along ~ 0,
    # but each step's error has rms sqrt(u (ulp - u)), i.e. lost_update_frac = sqrt(ulp / u - 1).
    n = 1 << 14
    frac, along, _, _ = next(_ones(n, 1, stochastic_rounding=True))
    p_up = U / 2.0**-7
    sd_along = math.sqrt(p_up * (1 - p_up) / n) * 2.0**-7 / U  # binomial sd of the mean step / u
    assert frac == pytest.approx(math.sqrt(2.0**-7 / U - 1), rel=0.15)
    assert abs(along) < 4 * sd_along


def test_kahan_pair_drift_is_the_bf16_rounding_of_the_compensation():
    """Over 1000 steps the pair (w, c) follows t = w + u + c (fp32), w' = RN_bf16(t),
    c' = RN_bf16(t - w') exactly (an independent numpy / ml_dtypes recurrence), and drifts from the
    exact fp64 sum 1 + N u. The drift telescopes into two per-step sums: e_c = c' - (t - w') (storing
    c in bf16) and e_t = t - (w + c + u) (the fp32 adds). Bounds: |t - w'| < 2^-8 (half an ulp of
    w' in [1, 2)) so |e_c| <= 2^-17 (half a bf16 ulp below 2^-8); |e_t| <= 2 * 2^-24 (two fp32
    roundings near 1-1.1). Hence |drift| <= N (2^-17 + 2^-23)."""
    ml = pytest.importorskip("ml_dtypes")
    import numpy as np

    bf16, f32 = ml.bfloat16, np.float32
    n_steps = 1000
    w, c, u = bf16(1.0), bf16(0.0), f32(U)
    e_c = e_t = 0.0
    for step, (_, _, tw, tc) in enumerate(_ones(1, n_steps, kahan=True)):
        t = f32(f32(f32(w) + u) + f32(c))
        w_new = bf16(t)
        c_new = bf16(f32(t - f32(w_new)))
        e_c += float(c_new) - (float(t) - float(w_new))
        e_t += float(t) - (float(w) + float(c) + float(u))
        w, c = w_new, c_new
        assert (float(tw[0]), float(tc[0])) == (float(w), float(c)), step
    drift = (float(w) + float(c)) - (1.0 + n_steps * float(u))
    assert drift == pytest.approx(e_c + e_t, abs=1e-12)
    assert abs(e_t) < 0.01 * abs(e_c)  # the cause: storing c in bf16, not the fp32 arithmetic
    assert abs(drift) <= n_steps * (2.0**-17 + 2.0**-23)
    assert drift / (n_steps * float(u)) == pytest.approx(0.028, abs=0.001)  # +2.8% of the summed updates
