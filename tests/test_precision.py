"""Precision modes: loss scaling against torch.amp.GradScaler, the fp16 emulation, pure bf16 with
stochastic rounding and Kahan summation, telemetry on hand-built tensors, and the modes end to end."""

import json
import math
import random
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise.config.loader import load_recipe
from stagewise.config.schema import LossScaleConfig, ModelConfig, OptimConfig, PrecisionConfig
from stagewise.errors import ConfigError
from stagewise.model import Transformer
from stagewise.objectives import OBJECTIVES, Batch
from stagewise.optim import build_optimizer
from stagewise.precision import CompensatedAdamW, build_precision
from stagewise.precision.pure_bf16 import stochastic_round_bf16
from stagewise.precision.telemetry import GradFormatStats, LostUpdate
from stagewise.rundir import read_metrics
from stagewise.train.step import train_step

CPU = torch.device("cpu")
INF, NAN = float("inf"), float("nan")


def _tiny(mode: str, **prec):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    precision = build_precision(PrecisionConfig(mode=mode, **prec), CPU)
    model = precision.setup(model)
    optimizer = precision.setup_optimizer(build_optimizer(OptimConfig(lr=1e-2), model, CPU))
    return model, precision, optimizer


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 128, (4, 17), generator=g)
        out.append(Batch(x[:, :-1], x[:, 1:]))
    return out


# --- loss scaling -------------------------------------------------------------------------


def test_fp16_loss_scaler_matches_torch_gradscaler_on_the_same_inf_nan_sequence():
    rng = random.Random(3)
    events = [rng.choice([None, None, None, INF, NAN, -INF]) for _ in range(60)]
    ls = LossScaleConfig(init_scale=2.0**10, growth_interval=3, min_scale=2.0**-30, max_scale=2.0**60)
    prec = build_precision(PrecisionConfig(mode="fp16-mixed", loss_scale=ls, telemetry_every=0), CPU)
    ours_p = torch.nn.Parameter(torch.zeros(4))
    ours_opt = torch.optim.SGD([ours_p], lr=1.0)
    ref_p = torch.nn.Parameter(torch.zeros(4))
    ref_opt = torch.optim.SGD([ref_p], lr=1.0)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)

    def loss_of(p, bad):
        coef = torch.tensor([1.0, 2.0, 3.0, bad if bad is not None else 4.0])
        return (p * coef).sum()

    for i, bad in enumerate(events):
        ours_opt.zero_grad(set_to_none=True)
        before = ours_p.detach().clone()
        prec.backward(loss_of(ours_p, bad))
        prec.unscale_(ours_opt)
        norm = torch.nn.utils.clip_grad_norm_([ours_p], 1e9)
        applied = prec.step(ours_opt, norm)

        ref_opt.zero_grad(set_to_none=True)
        ref_before = ref_p.detach().clone()
        ref.scale(loss_of(ref_p, bad)).backward()
        ref.unscale_(ref_opt)
        ref.step(ref_opt)
        ref.update()

        assert applied == (bad is None), i
        assert (not ref_p.detach().equal(ref_before)) == applied, i
        assert ours_p.detach().equal(ref_p.detach()), i
        assert prec.scaler.scale == ref.get_scale(), i
        assert (not ours_p.detach().equal(before)) == applied, i
    assert prec.skipped == sum(e is not None for e in events)


def test_loss_scale_bounds():
    from stagewise.precision import LossScaler

    s = LossScaler(init_scale=4.0, growth_interval=1, min_scale=1.0, max_scale=16.0)
    for _ in range(5):
        s.update(found_inf=True)
    assert s.scale == 1.0
    for _ in range(10):
        s.update(found_inf=False)
    assert s.scale == 16.0


def test_fp16_injected_inf_skips_exactly_that_step_and_training_continues():
    model, prec, opt = _tiny("fp16-mixed", telemetry_every=0)
    objective = OBJECTIVES["causal-lm"]
    target = model.layers[0].feed_forward.w1.weight
    inject = {"on": False}
    target.register_hook(lambda g: torch.full_like(g, INF) if inject["on"] else g)
    scales, applied = [], []
    for step in range(6):
        inject["on"] = step == 3
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scales.append(prec.scaler.scale)
        r = train_step(model, opt, prec, objective, _batches(2, seed=step), 1e-2, 1.0)
        applied.append(r.applied)
        same = all(before[k].equal(v) for k, v in model.state_dict().items())
        assert same == (step == 3)
        assert math.isfinite(r.loss)
    assert applied == [True, True, True, False, True, True]
    assert scales[4] == scales[3] / 2 and prec.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.state[target]["step"]) == 5  # the skipped step left Adam's state alone


def test_fp16_emulation_rounds_linear_inputs_outputs_and_gradients_to_fp16():
    prec = build_precision(PrecisionConfig(mode="fp16-mixed", telemetry_every=0), CPU)
    lin = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1.0 + 1e-5)  # values not on the fp16 grid
    x = torch.randn(4, 8, requires_grad=True)
    on_grid = lambda t: t.equal(t.half().float())  # noqa: E731
    with prec.autocast():
        y = lin(x)
    assert on_grid(y) and not on_grid(F.linear(x, lin.weight))
    assert torch.equal(y, F.linear(x.half().float(), lin.weight.half().float()).half().float())
    (y * 1.2345678).sum().backward()
    assert on_grid(lin.weight.grad) and on_grid(x.grad)
    assert not on_grid(x.grad.new_tensor(1.2345678))  # the upstream gradient itself was off the grid
    # Overflow is real: an fp16 activation above 65504 is inf.
    with prec.autocast():
        big = torch.nn.functional.linear(torch.full((1, 2), 300.0), torch.full((1, 2), 300.0))
    assert torch.isinf(big).all()


@pytest.mark.slow
def test_fp16_emulation_survives_torch_compile():
    """Inductor would fuse the fp16 round trips away; FP16Mixed.setup makes it keep them. The first
    loss (no update yet) is bitwise that of eager; later ones differ only by fp32 summation order."""
    losses = []
    for compiled in (False, True):
        model, prec, opt = _tiny("fp16-mixed", telemetry_every=0)
        run = torch.compile(model) if compiled else model
        losses.append([train_step(run, opt, prec, OBJECTIVES["causal-lm"], _batches(1, seed=i), 1e-2, 1.0).host().loss
                       for i in range(2)])
    assert losses[0][0] == losses[1][0]
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-4)


def test_fp16_with_accumulation_and_clipping_matches_fp32_gradients():
    """Clipping happens after unscaling: the reported norm and the clipped update track fp32."""
    mb = _batches(2, seed=5)
    res = {}
    for mode in ("fp32", "fp16-mixed"):
        model, prec, _ = _tiny(mode, telemetry_every=0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the clipped gradient itself
        before = {k: v.clone() for k, v in model.state_dict().items()}
        r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], mb, 1.0, 0.05).host()
        res[mode] = r, {k: v - before[k] for k, v in model.state_dict().items()}
    (r32, d32), (r16, d16) = res["fp32"], res["fp16-mixed"]
    assert r16.applied and r32.grad_norm > 0.05  # clipping is active
    assert r16.grad_norm == pytest.approx(r32.grad_norm, rel=1e-2)
    for k in d32:
        assert (d16[k] - d32[k]).norm() < 2e-3 * d32[k].norm() + 1e-9, k


# --- pure bf16 ----------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_only_picks_the_two_neighbours():
    ulp = 2.0**-7
    for value in (1.0 + 0.3 * ulp, -(1.0 + 0.7 * ulp), 3.0e-3 * (1 + 0.45 * ulp)):
        x = torch.full((200_000,), value)
        r = stochastic_round_bf16(x, torch.Generator().manual_seed(1)).float()
        lo, hi = sorted({float(v) for v in r.unique()})
        assert lo < value < hi and len(r.unique()) == 2
        frac = (value - lo) / (hi - lo)
        assert float((r == hi).float().mean()) == pytest.approx(frac, abs=0.005)
        assert float(r.double().mean()) == pytest.approx(value, rel=1e-4 * abs(hi - lo) / abs(value) * 50)
    exact = torch.tensor([1.0, -2.5, 0.0, INF, -INF])
    assert stochastic_round_bf16(exact).float().equal(exact)
    assert torch.isnan(stochastic_round_bf16(torch.tensor([NAN]))).all()


def _adam_on_ones(steps: int, **flags) -> torch.Tensor:
    """A constant gradient of -1 and betas 0: each step adds exactly lr, so only the weight's own
    rounding is tested (with betas near 1 the bf16 moments themselves stall, a separate effect)."""
    p = torch.nn.Parameter(torch.ones(1024, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p], lr=1e-4, betas=(0.0, 0.0), weight_decay=0.0, eps=1e-12, **flags)
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
    return p.detach().float()


def test_kahan_and_sr_recover_updates_plain_bf16_loses():
    plain = _adam_on_ones(1000)
    assert plain.eq(1.0).all()  # 1e-4 is below half an ulp (2^-8) of 1.0: every update is lost
    kahan = _adam_on_ones(1000, kahan=True)
    assert float(kahan.mean()) == pytest.approx(1.1, abs=0.01)
    sr = _adam_on_ones(1000, stochastic_rounding=True)
    assert float(sr.mean()) == pytest.approx(1.1, abs=0.005)
    both = _adam_on_ones(1000, stochastic_rounding=True, kahan=True)
    assert float(both.mean()) == pytest.approx(1.1, abs=0.01)


def test_compensated_adamw_matches_torch_adamw_where_rounding_cannot_matter():
    torch.manual_seed(0)
    w = torch.randn(64, 64).to(torch.bfloat16).float()
    p32 = torch.nn.Parameter(w.clone())
    p16 = torch.nn.Parameter(w.clone())
    ref = torch.optim.AdamW([p32], lr=1e-2, weight_decay=0.1)
    ours = CompensatedAdamW([p16], lr=1e-2, weight_decay=0.1)  # fp32 params: no rounding at all
    for _ in range(5):
        g = torch.randn(64, 64)
        p32.grad, p16.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.allclose(p16, p32, atol=1e-6)


def test_bf16_pure_keeps_weights_and_states_bf16():
    model, prec, opt = _tiny("bf16-pure", kahan=True, telemetry_every=1)
    r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    assert r.applied
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    state = next(iter(opt.state.values()))
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")} == {torch.bfloat16}
    m = prec.metrics()
    assert 0 <= m["lost_update_frac"] < 1 and m["grad_format"] == "bfloat16"


# --- telemetry on hand-built tensors -----------------------------------------------------


def test_grad_format_stats_known_answers():
    # fp16: smallest subnormal 2^-24 ~ 6e-8, smallest normal 2^-14 ~ 6.1e-5, max 65504.
    g = torch.tensor([0.0, 1e-8, 2.0**-20, 1.0, 7e4, INF, -2e-8, 1e-4])
    s = GradFormatStats(torch.float16)
    s.add("w", g)
    out = s.summary()
    n = g.numel()
    # flushed: 1e-8 and -2e-8, both below half of 2^-24 (they round to +-0)
    assert out["grad_flushed_frac"] == 2 / n
    assert out["grad_subnormal_frac"] == 1 / n  # 2^-20
    assert out["grad_overflow"] == 1 and out["grad_nonfinite"] == 1 and out["grad_sampled"] == n
    s16 = GradFormatStats(torch.bfloat16)
    s16.add("w", g)
    assert s16.summary()["grad_flushed_frac"] == 0 and s16.summary()["grad_overflow"] == 0
    # Per-layer aggregation is element-weighted; the worst layer is named.
    s.add("v", torch.zeros(8))
    assert s.summary()["grad_flushed_frac"] == 2 / 16 and s.summary()["grad_worst_layer"] == "w"
    assert s.summary()["grad_worst_layer_frac"] == 3 / 8


def test_grad_format_stats_samples_large_layers():
    s = GradFormatStats(torch.float16)
    s.add("big", torch.full((1000, 100), 1e-9))
    out = s.summary()
    assert out["grad_sampled"] <= 4096 and out["grad_flushed_frac"] == 1.0


def test_lost_update_fraction_known_answers():
    before = torch.ones(4)
    u = torch.full((4,), 2.0**-10)  # exact in fp32, below half a bf16 ulp of 1.0 (2^-8)
    for after, expected in ((before, 1.0), (before + u, 0.0), (before + u / 2, 0.5), (before + 2 * u, 1.0)):
        lu = LostUpdate()
        lu.add(before, after, u)
        assert lu.value() == pytest.approx(expected, abs=1e-9)
    # bf16 storage of 1.0 + 2^-10 loses the whole update.
    lu = LostUpdate()
    lu.add(before, (before + u).to(torch.bfloat16).float(), u)
    assert lu.value() == 1.0
    assert LostUpdate().value() is None


def test_fp16_emulation_telemetry_measures_the_unrounded_weight_gradient():
    """dL/dy = 1e-4 (normal in fp16) and x = 1e-4 make dL/dW = 1e-8 * S: flushed to zero by fp16
    at S = 1 (below half the smallest subnormal, 2^-25), a normal number at S = 2^16."""
    out = {}
    for scale in (1.0, 2.0**16):
        prec = build_precision(PrecisionConfig(mode="fp16-mixed", telemetry_every=1,
                                               loss_scale=LossScaleConfig(init_scale=scale)), CPU)
        lin = torch.nn.Linear(4, 4, bias=False)
        prec.setup(lin)
        opt = torch.optim.SGD(lin.parameters(), lr=0.0)
        with prec.autocast():
            y = lin(torch.full((1, 4), 1e-4))
        prec.backward((y * 1e-4).sum())
        prec.unscale_(opt)
        prec.step(opt, torch.tensor(1.0))
        out[scale] = prec.metrics()
    assert out[1.0]["grad_flushed_frac"] == 1.0 and out[1.0]["grad_worst_layer"] == "weight"
    assert out[2.0**16]["grad_flushed_frac"] == 0.0 and out[2.0**16]["grad_subnormal_frac"] == 0.0
    assert out[1.0]["loss_scale"] == 1.0 and out[1.0]["grad_sampled"] == 16


# --- fp8 and fake-quant modes (numerics tested in test_formats.py) ----------------------------


@pytest.mark.parametrize("mode", ["fp8", "mxfp4", "nvfp4", "int8", "int4", "ternary"])
def test_quant_modes_swap_linears_but_keep_names_and_high_precision_modules(mode):
    from stagewise.precision.formats import Float8Linear, QuantLinear

    model, prec, opt = _tiny(mode, telemetry_every=1)
    wrapper = Float8Linear if mode == "fp8" else QuantLinear
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["output"] is torch.nn.Linear and kinds["layers.0.attention.wq"] is wrapper
    assert len(prec.swapped) == 2 * 7
    plain = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and exports unchanged
    r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    assert r.applied and math.isfinite(r.loss)
    keys = prec.metrics()
    assert any(k.startswith("fp8_" if mode == "fp8" else "quant_weight_") for k in keys), keys


def test_keep_high_precision_patterns_choose_what_is_swapped():
    model, prec, _ = _tiny("int4", keep_high_precision=["*.feed_forward.*"])
    assert "output" in prec.swapped and not any("feed_forward" in n for n in prec.swapped)


def test_fp8_delayed_scaling_histories_round_trip_through_precision_state():
    from stagewise.config.schema import FP8Config

    model, prec, opt = _tiny("fp8", fp8=FP8Config(scaling="delayed", amax_history_len=4), telemetry_every=0)
    for i in range(3):
        train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1, seed=i), 1e-2, 1.0)
    state = json.loads(json.dumps(prec.state_dict()))  # goes through the checkpoint's JSON
    hist = state["fp8_scalers"]["layers.0.attention.wq"]["input"]["amax_history"]
    assert len(hist) == 3 and all(h > 0 for h in hist)
    _, fresh, _ = _tiny("fp8", fp8=FP8Config(scaling="delayed", amax_history_len=4), telemetry_every=0)
    fresh.load_state_dict(state)
    # Restored, every scaler takes its next scale from the recorded history, as the original does:
    # a tensor far below every recorded amax gets max / max(history), not the max / (its own amax)
    # of a scaler without one.
    probe = torch.full((4,), 1e-12)
    for name, roles in state["fp8_scalers"].items():
        for role, recorded in roles.items():
            restored, original = (getattr(p._modules[name], f"{role}_scaler") for p in (fresh, prec))
            want = restored.fmt.max / max(recorded["amax_history"])
            got = restored(probe).item()
            assert got == pytest.approx(want, rel=1e-6) and got == original(probe).item(), (name, role)


# --- precision schedules -------------------------------------------------------------------


def test_schedule_mode_at_and_stage_due():
    from stagewise.config.schema import PrecisionStageConfig
    from stagewise.precision.schedule import mode_at, stage_due

    cfg = PrecisionConfig(mode="bf16-mixed", schedule=[PrecisionStageConfig(at_step=3, mode="int4"),
                                                       PrecisionStageConfig(at_step=5, mode="bf16-pure")])
    # A checkpoint saved after s steps belongs to the mode that ran step s.
    assert [mode_at(cfg, s) for s in range(7)] == ["bf16-mixed"] * 4 + ["int4"] * 2 + ["bf16-pure"]
    assert [getattr(stage_due(cfg, s), "mode", None) for s in range(7)] == [None] * 3 + ["int4", None, "bf16-pure",
                                                                                       None]


def test_schedule_switch_keeps_parameters_and_optimizer_state():
    from stagewise.config.schema import PrecisionStageConfig
    from stagewise.precision.formats import QuantLinear
    from stagewise.precision.schedule import switch_precision

    stages = [PrecisionStageConfig(at_step=1, mode="int4"), PrecisionStageConfig(at_step=2, mode="bf16-pure"),
              PrecisionStageConfig(at_step=3, mode="fp16-mixed", optimizer_state="reset")]
    model, prec, opt = _tiny("bf16-mixed", kahan=True, schedule=stages, telemetry_every=0)
    params = list(model.parameters())
    build = lambda m: build_optimizer(OptimConfig(lr=1e-2), m, CPU)  # noqa: E731
    train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    for i, stage in enumerate(stages):
        moments = {id(p): opt.state[p]["exp_avg"].float().clone() for p in params}
        model, prec, opt = switch_precision(prec.cfg, stage, model, prec, opt, build, CPU)
        assert prec.name == stage.mode and prec.steps == i + 1 and list(model.parameters()) == params
        assert isinstance(model.layers[0].attention.wq, QuantLinear) == (stage.mode == "int4")
        want = torch.bfloat16 if stage.mode == "bf16-pure" else torch.float32
        assert {p.dtype for p in params} == {want}
        if stage.optimizer_state == "keep":
            assert all(torch.allclose(opt.state[p]["exp_avg"].float(), moments[id(p)], rtol=1e-2, atol=1e-6)
                       for p in params)
        else:
            assert not opt.state
        r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1, seed=i + 1), 1e-2, 1.0)
        assert r.applied and math.isfinite(r.loss)
    assert isinstance(opt, torch.optim.AdamW)


# --- config, plan, end to end ---------------------------------------------------------------


def test_precision_config_errors_name_the_field(tmp_path, corpus_dir, data_cache):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"^precision.kahan: only applies to precision.mode=bf16-pure"):
        load_recipe(recipe, ["--precision.kahan=true", "--precision.mode=fp16-mixed"])
    with pytest.raises(ConfigError, match=r"^precision.mode: expected one of .*fp16-mixed.*bf16-pure"):
        load_recipe(recipe, ["--precision.mode=fp12"])
    with pytest.raises(ConfigError, match=r"^precision.loss_scale.backoff_factor"):
        load_recipe(recipe, ["--precision.loss_scale.backoff_factor=2"])
    with pytest.raises(ConfigError, match=r"^precision.quant.group_size: only applies to precision.mode=int4"):
        load_recipe(recipe, ["--precision.mode=mxfp4", "--precision.quant.group_size=32"])
    with pytest.raises(ConfigError, match=r"^precision.quant.hadamard: only applies to the fake-quant modes"):
        load_recipe(recipe, ["--precision.mode=fp8", "--precision.quant.hadamard=true"])
    with pytest.raises(ConfigError, match=r"^precision.fp8.scaling: expected one of current, delayed, none"):
        load_recipe(recipe, ["--precision.mode=fp8", "--precision.fp8.scaling=lazy"])
    with pytest.raises(ConfigError, match=r"^precision.schedule\[1\].at_step: expected increasing steps"):
        load_recipe(recipe, ["--precision.schedule=[{at_step: 5, mode: int4}, {at_step: 5, mode: fp8}]"])
    with pytest.raises(ConfigError, match=r"^precision.schedule\[0\].optimizer_state: expected one of keep, reset"):
        load_recipe(recipe, ["--precision.schedule=[{at_step: 5, mode: int4, optimizer_state: drop}]"])
    load_recipe(recipe, ["--precision.schedule=[{at_step: 5, mode: bf16-pure}]", "--precision.kahan=true"])
    with pytest.raises(ConfigError, match=r"^precision.loss_scale.min_scale"):
        load_recipe(recipe, ["--precision.loss_scale.min_scale=8", "--precision.loss_scale.max_scale=4"])


def test_every_schema_mode_has_a_precision_class():
    from stagewise.config.schema import PRECISION_MODES
    from stagewise.precision import MODES

    assert list(MODES) == PRECISION_MODES
    assert all(MODES[m].name == m for m in MODES)


def test_plan_shows_bytes_per_parameter(tmp_path, corpus_dir, data_cache, capsys):
    from stagewise.cli import main

    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    assert main(["plan", str(recipe), "--precision.mode=bf16-pure", "--precision.kahan=true"]) == 0
    out = capsys.readouterr().out
    assert "weights 2, gradients 2, separate master copy 0; optimizer states: bf16-pure's own AdamW, bf16 moments " \
        "+ Kahan buffer" in out


def test_tf32_on_cpu_is_fp32_and_warns():
    m32, p32, o32 = _tiny("fp32")
    with pytest.warns(UserWarning, match="tf32"):
        mtf, ptf, otf = _tiny("tf32")
    a = train_step(m32, o32, p32, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    b = train_step(mtf, otf, ptf, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    assert a == b


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, corpus_dir, data_cache):
    root = tmp_path_factory.mktemp("precision_e2e")
    return root, tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs")


def _kill_resume_matches(root, recipe, name, *flags):
    short = ["--train.steps=8", "--train.batch_size=2", "--data.seq_len=32", "--checkpoint.every=4",
             "--eval.every=0", "--precision.telemetry_every=3", "--sample.max_new_tokens=2", *flags]
    run_cli("run", recipe, f"--name={name}-ref", *short)
    proc = run_cli("run", recipe, f"--name={name}-killed", *short, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "6"},
                   check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", root / "runs" / f"{name}-killed")
    ref, res = root / "runs" / f"{name}-ref", root / "runs" / f"{name}-killed"
    keys = ("step", "loss", "grad_norm", "loss_scale", "grad_flushed_frac", "lost_update_frac")
    la = [{k: r.get(k) for k in keys} for r in read_metrics(ref / "metrics.jsonl")]
    lb = [{k: r.get(k) for k in keys} for r in read_metrics(res / "metrics.jsonl")]
    assert la == lb and len(la) == 8
    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(res / "final" / "model.safetensors")
    assert all(wa[k].equal(wb[k]) for k in wa)
    return read_metrics(ref / "metrics.jsonl")


@pytest.mark.parametrize("flags", [["--precision.mode=fp16-mixed"],
                                   ["--precision.mode=bf16-pure", "--precision.stochastic_rounding=true",
                                    "--precision.kahan=true"],
                                   ["--precision.mode=fp8", "--precision.fp8.scaling=delayed"]],
                         ids=["fp16-mixed", "bf16-pure", "fp8"])
def test_modes_run_end_to_end_from_a_recipe(e2e, flags):
    root, recipe = e2e
    name = flags[0].split("=")[1] + "-quick"
    run_cli("run", recipe, f"--name={name}", "--train.steps=3", "--schedule.warmup_steps=1", "--train.batch_size=2",
            "--data.seq_len=32", "--eval.every=0", "--precision.telemetry_every=2", "--sample.max_new_tokens=2", *flags)
    rows = read_metrics(root / "runs" / name / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert "grad_flushed_frac" in rows[1] and "grad_flushed_frac" not in rows[0]
    assert "act_grad_layers" in rows[1] and "act_grad_sampled" not in rows[0]  # activation gradients too
    assert ("act_grad_lost_frac" in rows[1]) == (not flags[0].endswith("fp8"))  # fp8: no reference pass
    assert ("loss_scale" in rows[0]) == (flags[0].endswith("fp16-mixed"))
    assert (root / "runs" / name / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fp16_mixed_end_to_end_resumes_bitwise(e2e):
    rows = _kill_resume_matches(*e2e, "fp16", "--precision.mode=fp16-mixed", "--precision.loss_scale.growth_interval=2")
    assert all("loss_scale" in r for r in rows)
    assert "grad_flushed_frac" in rows[2] and "grad_flushed_frac" not in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_fp8_delayed_end_to_end_resumes_bitwise(e2e):
    rows = _kill_resume_matches(*e2e, "fp8", "--precision.mode=fp8", "--precision.fp8.scaling=delayed",
                                "--precision.fp8.amax_history_len=3")
    assert "fp8_grad_underflow_frac" in rows[2]


@pytest.mark.slow
@pytest.mark.parametrize("at_step,flags", [
    (4, ["--precision.mode=bf16-mixed", "--precision.kahan=true",
         "--precision.schedule=[{at_step: 4, mode: bf16-pure}]"]),  # the checkpoint at 4 is pre-switch
    (3, ["--precision.mode=fp16-mixed", "--precision.fp8.scaling=delayed",
         "--precision.schedule=[{at_step: 3, mode: fp8, optimizer_state: reset}]"]),  # the one at 4 is post-switch
], ids=["switch-at-checkpoint", "switch-before-checkpoint"])
def test_precision_schedule_resumes_bitwise_across_the_switch(e2e, at_step, flags):
    rows = _kill_resume_matches(*e2e, f"sched{at_step}", *flags)  # telemetry on steps 3 and 6
    if at_step == 4:  # bf16-mixed, then bf16-pure (lost updates measured only there)
        assert "lost_update_frac" not in rows[2] and "lost_update_frac" in rows[5]
    else:  # fp16-mixed (loss scale on every line), then fp8
        assert "loss_scale" in rows[2] and "loss_scale" not in rows[3] and "fp8_grad_underflow_frac" in rows[5]


@pytest.mark.slow
def test_bf16_pure_sr_kahan_end_to_end_resumes_bitwise(e2e):
    rows = _kill_resume_matches(*e2e, "bf16p", "--precision.mode=bf16-pure", "--precision.stochastic_rounding=true",
                                "--precision.kahan=true")
    assert "lost_update_frac" in rows[2] and rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((e2e[0] / "runs" / "bf16p-ref" / "final" / "config.json").read_text())


def test_fp8_telemetry_reports_per_layer_amax_and_current_scale():
    # One fp8 linear fed a known input: current scaling must report amax = max|x| and
    # scale = 448 / amax (e4m3's largest value over the tensor's amax).
    from stagewise.config.schema import FP8Config

    model, prec, opt = _tiny("fp8", fp8=FP8Config(scaling="current"), telemetry_every=1)
    wq = dict(model.named_modules())["layers.0.attention.wq"]
    wq_amax = float(wq.weight.detach().abs().max())  # the forward casts the weight before the update
    train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    layers = prec.metrics()["fp8_layers"]
    assert set(layers) == set(prec.swapped)
    for name, t in layers.items():
        assert t["input_scale"] == pytest.approx(448.0 / t["input_amax"], rel=1e-6), name
        assert t["weight_scale"] == pytest.approx(448.0 / t["weight_amax"], rel=1e-6), name
        assert t["grad_scale"] == pytest.approx(57344.0 / t["grad_amax"], rel=1e-6), name
    assert layers["layers.0.attention.wq"]["weight_amax"] == pytest.approx(wq_amax, rel=1e-6)
