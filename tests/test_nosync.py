"""The training step never makes the host wait for the device (issue "Performance", item 5).

There is no GPU in CI, so the check is structural: a TorchFunctionMode records every call that
would block the host on a CUDA tensor — reading a value back (item, bool, float, int, tolist,
numpy) or a blocking copy to the CPU — and the step runs under it on CPU tensors. On a CPU these
calls are free, which is exactly why they go unnoticed until a GPU profile shows the idle gaps.
"""

import math
import sys

import pytest
import torch

from stagewise.config.schema import ModelConfig, OptimConfig, PrecisionConfig
from stagewise.errors import ConfigError
from stagewise.model import Transformer
from stagewise.objectives import OBJECTIVES, Batch
from stagewise.optim import build_optimizer
from stagewise.precision import TF32, build_precision
from stagewise.train.step import StepResult, train_step
from stagewise.train.runner import pick_device

CPU = torch.device("cpu")
T = torch.Tensor


def _to_cpu(args, kwargs) -> bool:
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
        return False  # an asynchronous copy: the host does not wait for it
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu" for a in targets)


class SyncDetector(torch.overrides.TorchFunctionMode):
    """Records (call, where) for every host-device synchronisation point; `where` is the innermost
    stagewise function on the stack (file:function), or the innermost frame outside torch."""

    READS = {T.item, T.__bool__, T.__float__, T.__int__, T.__index__, T.tolist, T.numpy, T.cpu}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # torch's own .to(device) calls (clip_grad_norm_, fused AdamW) move to the parameters' device,
        # which is the CPU only in this test: only a .to("cpu") written in stagewise is a copy to the host.
        ours = "/torch/" not in sys._getframe(1).f_code.co_filename
        if func in self.READS or (func is T.to and ours and _to_cpu(args, kwargs)):
            self.calls.append((func.__name__, _site()))
        return func(*args, **kwargs)

    def sites(self) -> set[str]:
        return {site for _, site in self.calls}


def _site() -> str:
    f, fallback = sys._getframe(2), None
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if "/stagewise/" in path and "/tests/" not in path and f.f_code.co_name != "__torch_function__":
            return f"{path.rsplit('/stagewise/', 1)[1]}:{f.f_code.co_name}"
        if fallback is None and "/torch/" not in path:
            fallback = f"{path.rsplit('/', 1)[-1]}:{f.f_code.co_name}"
        f = f.f_back
    return fallback or "?"


def test_detector_catches_every_kind_of_sync():
    x = torch.ones(3)
    s = x.sum()
    cases = [lambda: s.item(), lambda: bool(s), lambda: float(s), lambda: int(s), lambda: x.tolist(),
             lambda: x.cpu(), lambda: x.numpy(), lambda: x.to("cpu"), lambda: x.to(CPU),
             lambda: x.to(device="cpu"), lambda: [1, 2][x[0].long()], lambda: math.isfinite(s)]
    for i, case in enumerate(cases):
        with SyncDetector() as d:
            case()
        assert len(d.calls) == 1, (i, d.calls)
    with SyncDetector() as d:  # device work and asynchronous copies are not syncs
        (x * 2).sum().sqrt()
        x.to(CPU, non_blocking=True)
        x.to(torch.float64)
        torch.where(torch.isfinite(s), x, x)
    assert d.calls == []


# --- the step ---------------------------------------------------------------------------------

# Documented exceptions (docs/guide.md, "What waits for the GPU"): fp16-mixed decides the skip and
# the next loss scale on the host; bf16-pure's update rule seeds its stochastic rounding from the
# host-side step count, so it decides the skip on the host too (and reads its CPU step counter).
EXPECTED = {
    "fp32": set(), "tf32": set(), "bf16-mixed": set(), "int8": set(), "fp8": set(),
    "fp16-mixed": {"precision/fp16.py:step"},
    "bf16-pure": {"precision/base.py:_apply", "precision/pure_bf16.py:step"},
}


def _tiny(mode: str, implementation: str = "auto"):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    precision = build_precision(PrecisionConfig(mode=mode, telemetry_every=0), CPU)
    model = precision.setup(model)
    optimizer = precision.setup_optimizer(
        build_optimizer(OptimConfig(lr=1e-2, implementation=implementation), model, CPU))
    return model, precision, optimizer


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [Batch(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, 128, (4, 17), generator=g) for _ in range(n))]


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_train_step_does_not_sync(mode, monkeypatch):
    monkeypatch.setattr(TF32, "_warned", True)  # warned once per process: leave that to test_precision
    model, prec, opt = _tiny(mode)
    for i in range(2):  # the second step runs with AdamW state present
        with SyncDetector() as d:
            r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(2, seed=i), 1e-2, 1.0,
                           normaliser=128)
        assert d.sites() == EXPECTED[mode], d.calls
    assert isinstance(r.loss, torch.Tensor) and r.loss.dim() == 0
    host = r.host()
    assert isinstance(host.loss, float) and isinstance(host.grad_norm, float) and host.applied is True


def test_foreach_adamw_falls_back_to_a_synchronous_skip():
    model, prec, opt = _tiny("fp32", implementation="foreach")
    with SyncDetector() as d:
        train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0, normaliser=64)
    assert d.sites() == {"precision/base.py:_apply"}


def test_host_is_one_readback_with_the_values_metrics_always_had():
    model, prec, opt = _tiny("fp32")
    r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(2), 1e-2, 1.0)
    with SyncDetector() as d:
        host = r.host()
    assert len(d.calls) == 1
    # The loss is float(fp32 loss sum) / count in double, as metrics.jsonl has always recorded it.
    loss_sum = sum(OBJECTIVES["causal-lm"](_tiny("fp32")[0], b).loss_sum.detach() for b in _batches(2))
    assert host.loss == float(loss_sum) / 128
    assert host.num_targets == 128 and host.grad_norm == float(r.grad_norm)


# --- skipping a non-finite step on the device ---------------------------------------------------


def _poison(model, on):
    target = model.layers[0].feed_forward.w1.weight
    target.register_hook(lambda g: torch.full_like(g, float("inf")) if on["on"] else g)


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed", "int8"])
def test_nonfinite_step_is_skipped_without_a_sync(mode):
    model, prec, opt = _tiny(mode)
    on = {"on": False}
    _poison(model, on)
    train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0, normaliser=64)
    on["on"] = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = [opt.state[p]["step"].clone() for p in opt.state]
    moments = [opt.state[p]["exp_avg"].clone() for p in opt.state]
    with SyncDetector() as d:
        r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1, seed=1), 1e-2, 1.0,
                       normaliser=64)
    assert d.sites() == set()
    assert opt.state and not r.host().applied and prec.skipped == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(opt.state[p]["step"], s) for p, s in zip(opt.state, steps))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(opt.state, moments))
    on["on"] = False  # training continues
    r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1, seed=2), 1e-2, 1.0)
    assert r.host().applied and all(float(opt.state[p]["step"]) == 2 for p in opt.state)


def test_fused_adamw_with_found_inf_zero_is_bitwise_the_plain_step():
    def run(found_inf):
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        for i in range(3):
            opt.zero_grad()
            lin(torch.randn(4, 8, generator=torch.Generator().manual_seed(i))).square().sum().backward()
            if found_inf:
                opt.found_inf = torch.zeros(())
            opt.step()
            opt.__dict__.pop("found_inf", None)
        return [p.detach() for p in lin.parameters()] + [v for s in opt.state.values() for v in s.values()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_bf16_pure_still_skips_exactly_that_step():
    model, prec, opt = _tiny("bf16-pure")
    on = {"on": True}
    _poison(model, on)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = train_step(model, opt, prec, OBJECTIVES["causal-lm"], _batches(1), 1e-2, 1.0)
    assert not r.host().applied and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


# --- device transfer ----------------------------------------------------------------------------


def test_to_device_on_cpu_does_not_pin(monkeypatch):
    x = torch.arange(6).view(2, 3)
    monkeypatch.setattr(T, "pin_memory", lambda self: pytest.fail("pinned for a CPU device"))
    b = Batch(x, x + 1).to(CPU)
    assert b.inputs is x and torch.equal(b.targets, x + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_on_cuda_pins_and_copies_asynchronously():
    x = torch.arange(6).view(2, 3)
    b = Batch(x, x + 1).to(torch.device("cuda"))
    assert b.inputs.is_cuda and torch.equal(b.targets.cpu(), x + 1)
    assert not x.is_pinned()  # the pinned staging copy is the helper's, the sampler's tensor is untouched


def test_step_result_host_on_a_plain_result():
    r = StepResult(torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5), 10, torch.tensor(False))
    assert r.host() == StepResult(2.0, 0.5, 10, False)


def test_pick_device_under_torchrun_takes_the_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert chosen == [torch.device("cuda", 1)] * 2 + [torch.device("cuda", 0)]


def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"^device: cuda requested but CUDA is not available"):
        pick_device("cuda")
