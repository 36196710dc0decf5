"""bf16 GEMM emulation for CPUs without a native bf16 GEMM, against torch's own bf16 autocast kernels.

torch's native CPU bf16 kernels are the reference: the emulation must give the same values (to
bf16 rounding of a different accumulation order) forward and backward, and a training run must
follow the native run's losses.
"""

import pytest
import torch
import torch.nn.functional as F

from stagewise.precision import cpu_bf16
from stagewise.precision.cpu_bf16 import BF16GemmEmulation

EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: one bf16 ulp, relative


def _ulps(a, b):
    """|a - b| in bf16 ulps of b (floored at 1% of b's mean magnitude, so zeros do not explode)."""
    a, b = a.float(), b.float()
    return (a - b).abs() / (EPS * b.abs().clamp_min(0.01 * b.abs().mean().item()))


def _linear(emulate: bool, x, w, b, g):
    for t in (x, w, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if emulate:
            with BF16GemmEmulation():
                y = F.linear(x, w, b)
        else:
            y = F.linear(x, w, b)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()


def test_linear_matches_native_bf16_within_one_ulp():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    b = torch.randn(128, requires_grad=True)
    g = torch.randn(4, 16, 128)
    native, emulated = _linear(False, x, w, b, g), _linear(True, x, w, b, g)
    for name, n, e in zip(("output", "input grad", "weight grad", "bias grad"), native, emulated):
        assert e.dtype == n.dtype and e.shape == n.shape, name
        assert _ulps(e, n).max() <= 1.0, name  # rounding the same fp32-exact products, summed in another order
    assert emulated[0].dtype == torch.bfloat16 and emulated[2].dtype == torch.float32


@pytest.mark.parametrize("op", ["matmul", "bmm", "sdpa"])
def test_other_matmul_ops_match_native_bf16(op):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 32, 16) for _ in range(3))

    def f():
        if op == "matmul":
            return q @ k.transpose(-1, -2)
        if op == "bmm":
            return torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = f()
        with BF16GemmEmulation():
            emulated = f()
    exact = f()
    assert emulated.dtype == native.dtype == torch.bfloat16
    if op == "sdpa":
        # The native kernel rounds the probabilities to bf16 before P @ V, the emulation keeps them
        # fp32: not the same bits, but at least as close to the fp32 result as the native kernel.
        assert (emulated.float() - exact).norm() <= 1.05 * (native.float() - exact).norm()
        assert (emulated.float() - exact).abs().max() <= 1.05 * (native.float() - exact).abs().max()
    else:
        assert _ulps(emulated, native).max() <= 1.0


def test_fp32_ops_pass_through_untouched():
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    with BF16GemmEmulation():
        y = F.linear(x, w)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x, w))


def test_choice_follows_the_cpu_and_the_override(monkeypatch):
    cpu = torch.device("cpu")
    for value, expect in (("native", False), ("emulate", True)):
        monkeypatch.setenv(cpu_bf16.ENV, value)
        cpu_bf16.native_bf16_gemm.cache_clear()
        assert cpu_bf16.emulates(cpu) is expect
    monkeypatch.delenv(cpu_bf16.ENV)
    cpu_bf16.native_bf16_gemm.cache_clear()
    assert cpu_bf16.emulates(cpu) is not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not cpu_bf16.emulates(torch.device("meta"))
    cpu_bf16.native_bf16_gemm.cache_clear()


def test_bf16_training_follows_the_native_kernels(tmp_path, corpus_dir, data_cache):
    """20 bf16-mixed steps, emulated vs torch's native bf16 kernels: the same run to bf16 noise."""
    from conftest import run_cli, tiny_recipe
    from stagewise.rundir import read_metrics

    recipe = tiny_recipe(tmp_path / "tiny.yaml", corpus_dir, data_cache, tmp_path / "runs")
    losses = {}
    for choice in ("native", "emulate"):
        run_cli("run", recipe, f"--name={choice}", "--precision.mode=bf16-mixed", "--checkpoint.every=0",
                "--eval.every=0", "--sample.prompts=[]", env={cpu_bf16.ENV: choice})
        losses[choice] = [r["loss"] for r in read_metrics(tmp_path / "runs" / choice / "metrics.jsonl")]
    assert len(losses["native"]) == len(losses["emulate"]) == 20
    assert losses["native"][0] == pytest.approx(losses["emulate"][0], rel=1e-4)
    assert max(abs(a - b) for a, b in zip(losses["native"], losses["emulate"])) < 5e-3


def test_compile_is_switched_off_only_under_the_emulation(monkeypatch):
    from stagewise.config.schema import PrecisionConfig
    from stagewise.precision import build_precision

    cpu = torch.device("cpu")
    for choice, bf16_compiles in (("emulate", False), ("native", True)):
        monkeypatch.setenv(cpu_bf16.ENV, choice)
        cpu_bf16.native_bf16_gemm.cache_clear()
        bf16 = build_precision(PrecisionConfig(mode="bf16-mixed"), cpu)
        fp32 = build_precision(PrecisionConfig(mode="fp32"), cpu)
        assert bf16.compiles(True) is bf16_compiles and bf16.emulates_bf16 is not bf16_compiles
        assert fp32.compiles(True) and not fp32.compiles(False)
        assert bf16.gemm_dtype == (torch.bfloat16 if bf16_compiles else torch.float32)
    cpu_bf16.native_bf16_gemm.cache_clear()


def test_compiled_emulated_linear_keeps_fp32_gemms():
    """Under torch.compile the emulated linear stays the custom op (inductor cannot fold its casts
    into a bf16 GEMM on the reference kernel) and computes what it computes eagerly."""
    from torch.profiler import profile

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    x = torch.randn(8, 64, requires_grad=True)

    def run(fn):
        x.grad = None
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), BF16GemmEmulation():
            y = fn(x)
        y.float().sum().backward()
        return y.detach(), x.grad.clone(), lin[0].weight.grad.clone()

    eager = run(lin)
    compiled_fn = torch.compile(lin)
    run(compiled_fn)  # compile
    with profile() as prof:
        compiled = run(compiled_fn)
    names = {e.name for e in prof.events()}
    assert "stagewise::emulated_bf16_linear" in names and "stagewise::emulated_bf16_mm" in names
    bf16_mm = [e for e in prof.events() if e.name == "aten::mm" and e.cpu_parent is not None
               and not e.cpu_parent.name.startswith("stagewise::")]
    assert not bf16_mm, [e.cpu_parent.name for e in bf16_mm]
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)


def test_emulation_writes_out_arguments():
    """torch.mm(..., out=t) under the emulation fills t (TRL's log-prob head writes its logits tiles so)."""
    from stagewise.precision.cpu_bf16 import BF16GemmEmulation

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    out = torch.zeros(4, 3, dtype=torch.bfloat16)
    with BF16GemmEmulation():
        r = torch.mm(a.bfloat16(), b.bfloat16(), out=out)
    assert r is out
    assert torch.equal(out, (a.bfloat16().float() @ b.bfloat16().float()).bfloat16())
