"""Per-token log-probabilities (stagewise/model/loss.py: linear_token_logprobs, logits_token_logprobs;
Transformer.token_logprobs) against torch.log_softmax of the full logits in float64, with an
arbitrary per-token output gradient (negative weights included), as DPO and policy gradients use."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from stagewise.config.schema import ModelConfig
from stagewise.model import loss as fused
from stagewise.model.llama import Transformer
from stagewise.precision.cpu_bf16 import BF16GemmEmulation

# 262144 at d 32 takes 32-row chunks by the default rule (two chunks of 25 rows); chunk=7 splits
# 50 rows into 7 x 7 + 1 (a ragged last chunk).
VOCABS = [97, 8192, 262144]


def _case(V, n=50, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(V, d, generator=g) * d ** -0.5 * 3
    t = torch.randint(0, V, (n,), generator=g)
    t[:4] = fused.IGNORE_INDEX
    t[-2:] = fused.IGNORE_INDEX
    t[20] = fused.IGNORE_INDEX
    weights = torch.randn(n, generator=g)  # per-token output gradient, about half negative
    return h, w, t, weights


def _truth(h, w, t):
    """log_softmax of the float64 logits at the targets, 0 on ignored rows."""
    valid = t != fused.IGNORE_INDEX
    logp = torch.log_softmax(h.double() @ w.double().t(), dim=-1)
    return torch.where(valid, logp.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)


def _grads(fn, h, w, t, weights):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = fn(h, w, t)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("chunk", [7, None])
def test_fp32_matches_float64_log_softmax(V, chunk):
    """Within the unfused fp32 path's own distance from the float64 truth (twice it), up to the
    error of an fp32 sum of V terms in another order, sqrt(V) * 2^-24 (as tests/test_fused_loss.py)."""
    h, w, t, weights = _case(V)
    true = _grads(_truth, h.double(), w.double(), t, weights)
    ref = _grads(lambda h, w, t: fused.logits_token_logprobs(F.linear(h, w), t), h, w, t, weights)
    got = _grads(lambda h, w, t: fused.linear_token_logprobs(h, w, t, torch.float32, chunk=chunk), h, w, t, weights)
    assert got[0].dtype == torch.float32 and got[0].shape == t.shape
    ignored = t == fused.IGNORE_INDEX
    assert torch.all(got[0][ignored] == 0)
    slack = V ** 0.5 * 2 ** -24
    err, ref_err = (got[0].double() - true[0]).abs().max(), (ref[0].double() - true[0]).abs().max()
    assert err <= 2 * ref_err + slack and err < 1e-4, (err, ref_err)
    for i in (1, 2):
        assert _rel(got[i], true[i]) <= 2 * _rel(ref[i], true[i]) + slack, (i, _rel(got[i], true[i]),
                                                                             _rel(ref[i], true[i]))
    assert torch.all(got[1][ignored] == 0)  # an ignored row's hidden state gets no gradient


def test_fallback_matches_float64_log_softmax():
    h, w, t, weights = _case(8192)
    true = _grads(_truth, h.double(), w.double(), t, weights)
    got = _grads(lambda h, w, t: fused.logits_token_logprobs(F.linear(h, w).view(5, 10, -1), t.view(5, 10)).flatten(),
                 h, w, t, weights)
    torch.testing.assert_close(got[0].double(), true[0], atol=1e-5, rtol=0)
    for i in (1, 2):
        assert _rel(got[i], true[i]) < 1e-5


@pytest.mark.parametrize("V", [97, 8192])
@pytest.mark.parametrize("emulate", [False, True])
@pytest.mark.parametrize("chunk", [7, None])
def test_bf16_no_further_from_the_truth_than_the_unfused_bf16_path(V, emulate, chunk):
    """bf16 GEMMs: the fused values and gradients are within the error of the unfused bf16
    reference (bf16 logits, fp32 log-softmax, autograd) of the float64 truth, as the fused loss is
    (tests/test_fused_loss.py)."""
    h, w, t, weights = _case(V)
    true = _grads(_truth, h.double(), w.double(), t, weights)
    mode = BF16GemmEmulation if emulate else contextlib.nullcontext
    with mode():
        ref = _grads(lambda h, w, t: fused.logits_token_logprobs(F.linear(h.bfloat16(), w.bfloat16()), t),
                     h, w, t, weights)
        got = _grads(lambda h, w, t: fused.linear_token_logprobs(h, w, t, torch.bfloat16, chunk=chunk),
                     h, w, t, weights)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype
    err, ref_err = (got[0].double() - true[0]).abs(), (ref[0].double() - true[0]).abs()
    assert err.max() <= 1.5 * ref_err.max() + 1e-3, (err.max(), ref_err.max())
    for i in (1, 2):
        assert _rel(got[i], true[i]) <= 1.5 * _rel(ref[i], true[i]) + 1e-3, (i, _rel(got[i], true[i]),
                                                                             _rel(ref[i], true[i]))


def test_without_grad_and_with_every_row_ignored():
    h, w, t, _ = _case(8192)
    with torch.no_grad():
        torch.testing.assert_close(fused.linear_token_logprobs(h, w, t, torch.float32).double(), _truth(h, w, t),
                                   atol=1e-5, rtol=0)
    h = h.clone().requires_grad_()
    out = fused.linear_token_logprobs(h, w, torch.full_like(t, fused.IGNORE_INDEX), torch.float32)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h.grad == 0)


# ---- Transformer.token_logprobs ---------------------------------------------------------------

TINY = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                   max_seq_len=64, init_std=0.1)


def _model(tie, fused_loss=True):
    torch.manual_seed(0)
    model = Transformer(replace(TINY, tie_embeddings=tie))
    model.fused_loss = fused_loss
    return model


def _tokens_targets():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (3, 20), generator=g)
    targets = torch.randint(0, 96, (3, 20), generator=g)
    targets[0, :5] = fused.IGNORE_INDEX
    targets[2, -3:] = fused.IGNORE_INDEX
    return tokens, targets


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("fused_loss", [True, False])
def test_model_token_logprobs_match_log_softmax_of_its_logits(tie, fused_loss):
    model = _model(tie, fused_loss)
    tokens, targets = _tokens_targets()
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    got = model.token_logprobs(tokens, targets)
    (got * weights).sum().backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    valid = targets != fused.IGNORE_INDEX
    logp = torch.log_softmax(model(tokens).double(), dim=-1)
    ref = torch.where(valid, logp.gather(-1, torch.where(valid, targets, 0)[..., None])[..., 0], 0.0)
    (ref * weights.double()).sum().backward()
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.detach().double(), ref.detach(), atol=1e-5, rtol=0)
    for g, p in zip(got_grads, model.parameters()):
        assert _rel(g, p.grad) < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_negative_token_logprobs_sum_to_the_fused_loss(tie):
    model = _model(tie)
    tokens, targets = _tokens_targets()
    nll = -model.token_logprobs(tokens, targets).sum()
    nll.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = model(tokens, targets=targets)
    loss.backward()
    torch.testing.assert_close(nll, loss, atol=0, rtol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert _rel(g, p.grad) < 1e-5


def test_model_token_logprobs_under_bf16_autocast():
    """Under autocast the fused path runs its GEMMs in bf16 (the compute dtype), like the loss:
    within bf16 rounding of the fp32 model's values."""
    model = _model(tie=True)
    tokens, targets = _tokens_targets()
    with torch.no_grad():
        ref = model.token_logprobs(tokens, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.token_logprobs(tokens, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.02)
