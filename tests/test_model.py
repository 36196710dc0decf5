"""The Llama model against independent references: naive attention, complex-number RoPE,
autograd's own record of saved tensors, and hand-counted parameters/FLOPs."""

import math
from dataclasses import replace

import pytest
import torch

from stagewise.config.schema import ModelConfig
from stagewise.errors import ConfigError
from stagewise.model.flops import estimate_memory, flops_per_token, param_counts
from stagewise.model.llama import Transformer, apply_rope, resolved_dims, rope_tables, validate_model_config

TINY = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                   max_seq_len=64, init_std=0.1)


def build(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


# ---- config ---------------------------------------------------------------------------------

def test_resolved_dims_defaults_and_errors():
    assert resolved_dims(ModelConfig(d_model=384, n_heads=6)) == (6, 64, 1024)   # 8/3*384 = 1024
    assert resolved_dims(ModelConfig(d_model=100, n_heads=5))[2] == 320           # 266.7 -> 320
    assert resolved_dims(ModelConfig(d_model=96, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=7)) == (2, 32, 7)
    with pytest.raises(ConfigError, match=r"^model.n_kv_heads: expected a divisor of n_heads=6, got 4$"):
        resolved_dims(ModelConfig(n_heads=6, n_kv_heads=4))
    with pytest.raises(ConfigError, match="model.d_model"):
        validate_model_config(ModelConfig(vocab_size=10, d_model=100, n_heads=6))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        validate_model_config(ModelConfig())
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        Transformer(replace(TINY, n_kv_heads=3))


# ---- attention, RoPE, masking ---------------------------------------------------------------

def naive_rope(x, base):
    """Rotate (x[i], x[i + d/2]) as the complex number x[i] + j*x[i + d/2] by pos * base^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * i / d)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_matches_complex_rotation():
    x = torch.randn(2, 3, 40, 32)
    cos, sin = rope_tables(32, 64, 500000.0)
    got = apply_rope(x, cos[:40], sin[:40])
    torch.testing.assert_close(got.double(), naive_rope(x, 500000.0), atol=1e-5, rtol=1e-5)


def naive_block_attention(attn, x, base, eps):
    """softmax(QK^T / sqrt(d) + causal mask) V with explicit repeated kv heads, in float64."""
    B, T, _ = x.shape
    H, K, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()
    W = lambda lin: lin.weight.double()  # noqa: E731
    q = (x @ W(attn.wq).T).view(B, T, H, hd)
    k = (x @ W(attn.wk).T).view(B, T, K, hd)
    v = (x @ W(attn.wv).T).view(B, T, K, hd).transpose(1, 2)
    if attn.q_norm is not None:
        rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.double()  # noqa: E731
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = naive_rope(q.transpose(1, 2), base), naive_rope(k.transpose(1, 2), base)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, H * hd) @ W(attn.wo).T


@pytest.mark.parametrize("n_kv_heads,head_dim,qk_norm", [(4, None, False), (2, None, False), (1, 24, False),
                                                         (2, 24, True)])
def test_attention_matches_naive_gqa(n_kv_heads, head_dim, qk_norm):
    cfg = replace(TINY, n_kv_heads=n_kv_heads, head_dim=head_dim, qk_norm=qk_norm, rope_base=1000.0)
    model = build(cfg)
    attn = model.layers[0].attention
    if qk_norm:  # non-trivial norm weights, so the test sees them
        torch.nn.init.uniform_(attn.q_norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(attn.k_norm.weight, 0.5, 1.5)
    x = torch.randn(2, 24, cfg.d_model)
    T = x.shape[1]
    got = attn(x, model.rope_cos[:T], model.rope_sin[:T], None, None, 0)
    torch.testing.assert_close(got.double(), naive_block_attention(attn, x, cfg.rope_base, cfg.norm_eps),
                               atol=1e-5, rtol=1e-4)


def test_causal_masking():
    model = build()
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    base = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 1e-4  # every later position sees it


def test_qk_norm_runs_and_changes_output():
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    plain, normed = build(), build(replace(TINY, qk_norm=True))
    assert "layers.0.attention.q_norm.weight" in normed.state_dict()
    assert "layers.0.attention.q_norm.weight" not in plain.state_dict()
    # Norm weights start at 1 and consume no randomness, so every other weight is identical.
    for name, p in plain.named_parameters():
        assert torch.equal(p, normed.get_parameter(name))
    out = normed(tokens)
    assert out.shape == (2, 16, TINY.vocab_size) and torch.isfinite(out).all()
    assert (out - plain(tokens)).abs().max() > 1e-3


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        build()(torch.zeros(1, 65, dtype=torch.long))


# ---- parameters and initialisation ----------------------------------------------------------

def test_tied_and_untied_heads():
    tied, untied = build(replace(TINY, tie_embeddings=True)), build(replace(TINY, tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 - parameters() dedupes shared ones
    assert n(untied) - n(tied) == TINY.vocab_size * TINY.d_model
    tied(torch.randint(0, TINY.vocab_size, (1, 8))).sum().backward()
    assert tied.tok_embeddings.weight.grad is tied.output.weight.grad


def test_init_statistics():
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=8, n_heads=4, ffn_dim=512,
                      tie_embeddings=False, qk_norm=True, init_std=0.02)
    model = build(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
        # >= 65k samples per matrix: the std estimate's relative error is ~0.3%.
        assert abs(p.std().item() / want - 1) < 0.02, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.05 * want, name


def test_init_is_deterministic():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(p, r), name
    # An explicit generator decides the init whatever the global RNG state.
    torch.manual_seed(123)
    a.init_weights(torch.Generator().manual_seed(7))
    torch.manual_seed(456)
    c.init_weights(torch.Generator().manual_seed(7))
    for p, r in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, r)


# ---- parameter / FLOP / memory arithmetic ---------------------------------------------------

@pytest.mark.parametrize("tie,qk_norm,head_dim", [(True, False, None), (False, False, None), (False, True, 24)])
def test_param_counts_match_module(tie, qk_norm, head_dim):
    cfg = replace(TINY, tie_embeddings=tie, qk_norm=qk_norm, head_dim=head_dim)
    model = build(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == model.tok_embeddings.weight.numel()
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    # Every nn.Linear runs a matmul, the tied head included (it is a Linear sharing the embedding).
    assert counts["matmul"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16)
    # per layer: wq 8*8 + wk 8*4 + wv 8*4 + wo 8*8 = 192; w1, w2, w3 3*8*16 = 384; head 100*8 = 800
    matmul = 2 * (192 + 384) + 800
    assert param_counts(cfg)["matmul"] == matmul == 1952
    assert flops_per_token(cfg, 10) == 6 * 1952 + 12 * 2 * 2 * 4 * 10 == 13632


def saved_activation_bytes(model, tokens, autocast):
    """Bytes of the distinct storages autograd saves during forward, parameters and buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return sum(storages.values())


@pytest.mark.parametrize("autocast,tie,qk_norm", [
    (False, True, False), (False, False, True), (True, True, False), (True, False, True),
])
def test_activation_estimate_matches_saved_tensors(autocast, tie, qk_norm):
    cfg = replace(TINY, tie_embeddings=tie, qk_norm=qk_norm, d_model=96, n_heads=6, n_kv_heads=2, ffn_dim=256)
    B, T = 3, 48
    measured = saved_activation_bytes(build(cfg), torch.randint(0, cfg.vocab_size, (B, T)), autocast)
    estimate = estimate_memory(cfg, B, T, act_bytes=2 if autocast else 4, fused_loss=False)  # model(tokens): unfused
    assert estimate["activations"] == measured  # to the byte: derived op by op for this model
    n = param_counts(cfg)["total"]
    assert (estimate["params"], estimate["grads"], estimate["optimizer"]) == (4 * n, 4 * n, 8 * n)
    parts = ("params", "grads", "optimizer", "activations", "logits")  # the rest are the memory plan's details
    assert estimate["total"] == sum(estimate[k] for k in parts)


def _reference_loss_and_grads(model, tokens, targets, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    (loss / 100).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_matches_logits_cross_entropy(autocast, tie):
    """forward(targets=) chunks the head + loss (model/loss.py). In fp32 it equals materialising the
    logits to rounding; under bf16 autocast it is no further from the fp32 result than the
    logits path itself is."""
    from stagewise.model import loss as fused

    cfg = replace(TINY, tie_embeddings=tie)
    model = build(cfg)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (3, 40), generator=g)
    targets[0, :7] = -100  # ignored rows, inside and across chunk boundaries
    targets[2, 30:] = -100
    true_loss, true_grads = _reference_loss_and_grads(model, tokens, targets, autocast=False)
    ref_loss, ref_grads = _reference_loss_and_grads(model, tokens, targets, autocast)

    def dist(grads, n):
        return ((grads[n] - true_grads[n]).norm() / true_grads[n].norm()).item()

    for chunk in (7, 120, None):  # several chunks with a ragged last one; one chunk; the default
        original = fused.chunk_rows
        fused.chunk_rows = (lambda *_, c=chunk: c) if chunk else original
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(tokens, targets=targets)
        finally:
            fused.chunk_rows = original
        (loss / 100).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert loss.dtype == torch.float32 and loss.ndim == 0
        if autocast:
            assert abs(loss.item() - true_loss.item()) <= 1.5 * abs(ref_loss.item() - true_loss.item()) + 1e-4
            for n in grads:
                assert dist(grads, n) <= 1.5 * dist(ref_grads, n) + 1e-3, (n, chunk, dist(grads, n),
                                                                           dist(ref_grads, n))
        else:
            assert abs(loss.item() / true_loss.item() - 1) < 1e-6
            assert all(dist(grads, n) < 1e-5 for n in grads), {n: dist(grads, n) for n in grads}
        model.zero_grad(set_to_none=True)


def test_fused_loss_without_grad_and_with_all_targets_ignored():
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    targets = torch.randint(0, TINY.vocab_size, (2, 16))
    with torch.no_grad():
        a = model(tokens, targets=targets)
        logits = model(tokens)
    b = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    assert torch.allclose(a, b, rtol=1e-5)
    none = model(tokens, targets=torch.full_like(targets, -100))
    none.backward()
    assert none.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_backward_is_the_derivative(unit_offset):
    """The hand-written backward (it saves only x and 1/rms) against autograd's numerical check."""
    from stagewise.model.llama import RMSNorm

    norm = RMSNorm(12, 1e-6, unit_offset).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    xf = x.detach()
    plain = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1 + norm.weight) if unit_offset else norm.weight)
    assert torch.equal(norm(x).detach(), plain.detach())
