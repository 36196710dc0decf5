"""The fused head + cross-entropy (stagewise/model/loss.py) against the unfused reference at the
vocabulary sizes its chunking is tuned for: 8k (the built-in tokenizer), 152k (Qwen) and 262k
(Gemma 3), in fp32 and bf16 (the native kernels and the CPU bf16 emulation)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from stagewise.model import loss as fused
from stagewise.precision.cpu_bf16 import BF16GemmEmulation

VOCABS = [8192, 151936, 262144]


def _case(V, n=48, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(V, d, generator=g) * d ** -0.5 * 3
    t = torch.randint(0, V, (n,), generator=g)
    t[:5] = fused.IGNORE_INDEX  # ignored rows inside the first chunk
    t[-3:] = fused.IGNORE_INDEX
    return h, w, t


def _grads(fn, h, w, t):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fn(h, w, t)
    (loss / 10).backward()
    return loss.detach(), h.grad, w.grad


def _ref(dtype):
    return lambda h, w, t: fused.logits_cross_entropy(F.linear(h.to(dtype), w.to(dtype)), t)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("chunk", [7, None])  # several ragged chunks; the default rule
def test_fp32_matches_unfused(V, chunk):
    """Against a float64 truth: no further from it than the unfused fp32 path, up to the error of
    an fp32 sum of V terms in some order, sqrt(V) * 2^-24 (the hidden-state gradient sums V
    products; with 7-row chunks the GEMM kernel sums them in a different order than for 48 rows)."""
    h, w, t = _case(V)
    true = _grads(_ref(torch.float64), h.double(), w.double(), t)
    ref = _grads(_ref(torch.float32), h, w, t)
    got = _grads(lambda h, w, t: fused.linear_cross_entropy(h, w, t, torch.float32, chunk=chunk), h, w, t)
    assert abs(got[0].item() / true[0].item() - 1) < 1e-6
    for i in (1, 2):
        assert _rel(got[i], true[i]) <= 2 * _rel(ref[i], true[i]) + V ** 0.5 * 2 ** -24, (i, _rel(got[i], true[i]),
                                                                           _rel(ref[i], true[i]))


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize("chunk", [7, None])
def test_bf16_no_further_from_fp32_than_the_unfused_bf16_path(V, emulate, chunk):
    """Same bound as tests/test_model.py: the fused bf16 loss and gradients are no further from
    the fp32 truth than the unfused bf16 reference is (their roundings differ only in place)."""
    h, w, t = _case(V)
    true = _grads(_ref(torch.float32), h, w, t)
    mode = BF16GemmEmulation if emulate else contextlib.nullcontext
    with mode():
        ref = _grads(_ref(torch.bfloat16), h, w, t)
        got = _grads(lambda h, w, t: fused.linear_cross_entropy(h, w, t, torch.bfloat16, chunk=chunk), h, w, t)
    assert got[0].dtype == torch.float32
    assert abs(got[0].item() - true[0].item()) <= 1.5 * abs(ref[0].item() - true[0].item()) + 1e-3 * abs(true[0].item())
    for i in (1, 2):
        assert _rel(got[i], true[i]) <= 1.5 * _rel(ref[i], true[i]) + 1e-3, (i, _rel(got[i], true[i]),
                                                                             _rel(ref[i], true[i]))


def test_emulated_and_native_bf16_agree():
    """The emulation computes what the native bf16 kernels compute, up to accumulation order."""
    h, w, t = _case(151936)
    native = _grads(lambda h, w, t: fused.linear_cross_entropy(h, w, t, torch.bfloat16, chunk=13), h, w, t)
    with BF16GemmEmulation():
        emulated = _grads(lambda h, w, t: fused.linear_cross_entropy(h, w, t, torch.bfloat16, chunk=13), h, w, t)
    assert abs(native[0].item() / emulated[0].item() - 1) < 1e-3
    assert _rel(native[1], emulated[1]) < 1e-2 and _rel(native[2], emulated[2]) < 1e-2


def test_underflowing_target_probability_gives_the_exact_loss():
    """A target logit ~200 below the row's maximum has probability 0 in fp32: the loss is taken
    as log-sum-exp - logit (the log-sum-exp from the row maximum's probability), not -log(p), so
    it stays finite and exact."""
    V, d = 8192, 4
    h = torch.zeros(3, d)
    h[:, 0] = 1.0
    w = torch.zeros(V, d)
    w[0, 0] = 100.0   # logit 100 for token 0
    w[1, 0] = -100.0  # logit -100 for token 1
    t = torch.tensor([1, 0, 5])
    want = fused.logits_cross_entropy(F.linear(h, w), t)
    got = fused.linear_cross_entropy(h, w, t, torch.float32)
    assert torch.isfinite(got) and abs(got.item() / want.item() - 1) < 1e-6, (got, want)
    assert want.item() > 299  # 200 + 100 for the first row, ~100 for the third


@pytest.mark.parametrize("V,d,rows", [(262144, 640, 320), (151936, 1024, 512), (128256, 2048, 1024),
                                      (8192, 384, 1024)])
def test_chunk_rows_rule(V, d, rows):
    """d / 2 rows in bf16 (the head's fp32 gradient's size), at least 2^23 / V for small vocabularies."""
    assert fused.chunk_rows(V, d, 2) == rows
    assert fused.chunk_rows(V, d, 4) * V * 12 <= max(4 * V * d, 12 * (1 << 23))
