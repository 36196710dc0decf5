"""Schedules, the step function, metrics: each against values known by construction."""

import json
import math
import subprocess
import sys

import pytest
import torch

from stagewise.config.schema import ScheduleConfig
from stagewise.objectives import IGNORE_INDEX, Batch, causal_lm_loss
from stagewise.optim import lr_at, param_groups
from stagewise.precision import BF16Mixed, Precision
from stagewise.rundir import read_metrics
from stagewise.train import metrics as M
from stagewise.train.step import train_step


@pytest.mark.parametrize("name,step,expected", [
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0), ("cosine", 60, 0.55), ("cosine", 110, 0.1),
    ("linear", 0, 0.1), ("linear", 35, 1.0 - 0.9 * 0.25), ("linear", 60, 0.55), ("linear", 110, 0.1),
    ("constant", 5, 0.6), ("constant", 110, 1.0),
])
def test_schedule_known_points(name, step, expected):
    # peak 1, warmup 10, 111 steps: steps 10..110 are the 100-step decay span.
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(step, 1.0, 111, cfg) == pytest.approx(expected)


def test_cosine_midpoint_is_mean_of_peak_and_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 2.0, 101, cfg) == pytest.approx(1.0)
    assert lr_at(25, 2.0, 101, cfg) == pytest.approx(1.0 + math.cos(math.pi / 4))


def test_wsd_holds_then_decays():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(s, 1.0, 100, cfg) for s in range(100)]
    assert lrs[9] == 1.0 and all(v == 1.0 for v in lrs[10:81])
    assert lrs[90] == pytest.approx(1.0 - 0.9 * 10 / 19)
    assert lrs[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.out = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        return self.out(self.norm(self.emb(x)))


def _batches(masked=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (4, 6), generator=g)
    y = torch.randint(0, 11, (4, 6), generator=g)
    if masked:  # uneven target counts per micro-batch, as in SFT with masked prompts
        y[0, :5] = IGNORE_INDEX
        y[3, :2] = IGNORE_INDEX
    return x, y


@pytest.mark.parametrize("masked", [False, True])
def test_grad_accumulation_equals_one_big_batch(masked):
    x, y = _batches(masked)
    results, states = [], []
    for micro in ([Batch(x, y)], [Batch(x[:2], y[:2]), Batch(x[2:], y[2:])],
                  [Batch(x[i:i + 1], y[i:i + 1]) for i in range(4)]):
        torch.manual_seed(0)
        model = TinyLM()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
        res = train_step(model, opt, Precision(torch.device("cpu")), causal_lm_loss, micro, lr=1e-2,
                         grad_clip=0).host()
        results.append(res)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    # reference: plain mean cross-entropy over all counted targets
    torch.manual_seed(0)
    ref = torch.nn.functional.cross_entropy(TinyLM()(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    for res, st in zip(results, states):
        assert res.loss == pytest.approx(float(ref.detach()), rel=1e-6)
        assert res.num_targets == int((y != IGNORE_INDEX).sum())
        for k in st:
            torch.testing.assert_close(st[k], states[0][k], rtol=1e-5, atol=1e-6)


def test_clipping_reports_preclip_norm_and_clips():
    x, y = _batches()
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, opt, Precision(torch.device("cpu")), causal_lm_loss, [Batch(x, y)], lr=0.0,
                     grad_clip=1e-3)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert res.grad_norm > 1e-3
    assert float(after) == pytest.approx(1e-3, rel=1e-4)


def test_nonfinite_gradient_skips_update():
    x, y = _batches()
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def poisoned(m, b):
        out = causal_lm_loss(m, b)
        return out._replace(loss_sum=out.loss_sum * float("inf"))

    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    res = train_step(model, opt, Precision(torch.device("cpu")), poisoned, [Batch(x, y)], lr=1.0, grad_clip=1.0)
    assert not res.applied
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bf16_mixed_keeps_fp32_weights_and_computes_in_bf16():
    prec = BF16Mixed(torch.device("cpu"))
    lin = torch.nn.Linear(4, 4)
    with prec.autocast():
        out = lin(torch.randn(2, 4))
    assert lin.weight.dtype == torch.float32 and out.dtype == torch.bfloat16


def test_weight_decay_groups_skip_embeddings_and_norms():
    model = TinyLM()
    model.out.weight = model.emb.weight  # tied: the shared matrix is an embedding
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [] and len(no_decay["params"]) == 3


def test_mfu_known_answer():
    assert M.mfu(1e6, 100.0, 1e9) == pytest.approx(0.1)
    assert M.mfu(1e6, 100.0, 0.0) == 0.0


def test_peak_flops_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv(M.PEAK_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(M, "measure_peak_flops", lambda d, t: calls.append(t) or 123e9)
    assert M.peak_flops(torch.device("cpu"), torch.bfloat16) == 123e9
    assert M.peak_flops(torch.device("cpu"), torch.bfloat16) == 123e9
    assert calls == [torch.bfloat16]
    assert [e["flops"] for e in json.loads((tmp_path / "stagewise" / "peak_flops.json").read_text()).values()] == [123e9]
    monkeypatch.setenv(M.PEAK_ENV, "5e9")
    assert M.peak_flops(torch.device("cpu"), torch.float32) == 5e9


def test_measure_peak_flops_is_a_real_measurement():
    # 2*n^3 FLOPs per matmul timed: any CPU manages more than 1 GFLOP/s in fp32, none 100 TFLOP/s.
    assert 1e9 < M.measure_peak_flops(torch.device("cpu"), torch.float32, seconds=0.2) < 1e14


def test_metrics_log_drops_steps_after_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    log = M.MetricsLog(path, resume_step=5)
    log.write({"step": 6, "loss": 60})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6]
    assert read_metrics(path)[-1]["loss"] == 60


def test_peak_memory_counts_a_known_allocation():
    # In a fresh process the high-water mark is about where its memory is now, so touching a
    # 256 MiB tensor must raise it by 256 MiB (measured: +257.5 MiB), not by nothing (a peak that
    # was already higher, as in this test process) and not by the whole process.
    code = ("import torch\nfrom stagewise.train.metrics import peak_memory_bytes as peak\n"
            "cpu = torch.device('cpu')\nbefore = peak(cpu)\nx = torch.ones(64 * 2**20)\nprint(before, peak(cpu))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert 0.95 * 2**28 <= after - before <= 2**28 + 16 * 2**20, (before, after)


class _Stream(__import__("io").StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bar_on_tty_and_plain_lines_otherwise():
    from stagewise.train.progress import Progress

    tty = _Stream(True)
    bar = Progress(total_steps=4, start_step=0, mode="auto", stream=tty)
    for step in range(1, 5):
        bar.update(step, loss=2.5, tokens_per_s=1000.0, mfu=0.25, val_loss=2.4 if step == 4 else None)
    bar.close()
    shown = tty.getvalue()
    assert "\r" in shown and "4/4" in shown and "loss=2.5000" in shown and "MFU=25.0%" in shown

    pipe = _Stream(False)
    plain = Progress(total_steps=4, start_step=0, mode="auto", every=2, stream=pipe)
    for step in range(1, 5):
        plain.update(step, loss=2.5, tokens_per_s=1000.0, mfu=0.25)
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 2
    assert lines[-1].startswith("step 4/4 | loss 2.5000 | 1,000 tok/s | MFU 25.0% | ETA")
