"""KV-cached sampling against recomputing the full forward, and logit filters on hand-built inputs."""

import math
from dataclasses import replace

import pytest
import torch

from stagewise.config.schema import ModelConfig
from stagewise.generate.sampling import filter_logits, generate
from stagewise.model.llama import KVCache, Transformer

CFG = ModelConfig(vocab_size=80, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                  max_seq_len=48, init_std=0.3)


def build(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg)


def greedy_without_cache(model, prompt, n):
    """The reference: rerun the whole sequence every step and take the argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_greedy_equals_full_recompute(qk_norm):
    model = build(replace(CFG, qk_norm=qk_norm))
    prompt = torch.randint(0, CFG.vocab_size, (7,)).tolist()
    with torch.no_grad():
        want = greedy_without_cache(model, prompt, 20)
    assert generate(model, prompt, 20) == want
    assert len(set(want)) > 3  # a degenerate repeat-one-token model would prove little


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_logits_match_uncached(qk_norm):
    # init_std 0.1 keeps logits O(1), so 1e-5 is ~10 fp32 ulps of kernel-order noise, not a loose bound.
    model = build(replace(CFG, qk_norm=qk_norm, init_std=0.1))
    tokens = torch.randint(0, CFG.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, batch_size=2)
        # prefix (is_causal path), a multi-token chunk after it (explicit mask), then single tokens
        chunks = [(0, 11), (11, 20), (20, 21), (21, 22), (22, 30)]
        for start, end in chunks:
            assert cache.pos == start
            got = model(tokens[:, start:end], cache=cache)
            assert (got - full[:, start:end]).abs().max() < 1e-5, (start, end)
        assert cache.pos == 30


def test_cache_capacity_is_enforced():
    model = build()
    cache = KVCache.for_model(model, max_len=10)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="limit of 10"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# probabilities 0.5, 0.3, 0.15, 0.05 at shuffled positions 2, 0, 3, 1
PROBS = torch.tensor([0.3, 0.05, 0.5, 0.15])


def survivors(filtered):
    return set(torch.nonzero(torch.isfinite(filtered)).flatten().tolist())


@pytest.mark.parametrize("top_k,top_p,expected", [
    (0, 1.0, {0, 1, 2, 3}),
    (1, 1.0, {2}),
    (2, 1.0, {0, 2}),
    (3, 1.0, {0, 2, 3}),
    (0, 0.4, {2}),          # 0.5 alone reaches 0.4
    (0, 0.75, {0, 2}),      # 0.5 + 0.3
    (0, 0.83, {0, 2, 3}),   # 0.8 < 0.83, so 0.15 is needed
    (0, 0.99, {0, 1, 2, 3}),
    (3, 0.83, {0, 2}),      # after top-3 the survivors renormalise to .526/.316/.158: .842 >= .83
])
def test_filter_logits_surviving_sets(top_k, top_p, expected):
    logits = PROBS.log() + 1.7  # a shift changes nothing
    out = filter_logits(logits, top_k, top_p)
    assert survivors(out) == expected
    assert torch.equal(out[list(expected)], logits[list(expected)])  # survivors keep their logits
    batched = filter_logits(torch.stack([logits, logits.flip(0)]), top_k, top_p)
    assert survivors(batched[0]) == expected
    assert survivors(batched[1]) == {3 - i for i in expected}


def test_top_k_keeps_ties():
    assert survivors(filter_logits(torch.tensor([1.0, 3.0, 2.0, 2.0]), top_k=2)) == {1, 2, 3}


def test_filter_logits_refuses_impossible_settings():
    with pytest.raises(ValueError, match="top_p=0.0"):
        filter_logits(PROBS.log(), top_p=0.0)


def test_temperature_sampling_is_reproducible():
    model = build()
    prompt = [1, 2, 3]
    sample = lambda seed, **kw: generate(model, prompt, 25, temperature=1.0,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed), **kw)
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(5, top_k=3, top_p=0.9) == sample(5, top_k=3, top_p=0.9)
    assert sample(2, top_k=1) == generate(model, prompt, 25)  # top-1 sampling is greedy


def test_sampling_draws_from_the_filtered_distribution():
    """With an output head that ignores the input, samples follow softmax(logits / T) over top-k."""
    model = build(replace(CFG, vocab_size=4, n_layers=1, tie_embeddings=False))
    with torch.no_grad():
        model.output.weight.zero_()
    # A zero head plus a fixed vector added by a hook: the same logits whatever the context.
    bias = torch.tensor([2.0, 1.0, 0.0, -1.0])
    model.output.register_forward_hook(lambda mod, inp, out: out + bias)
    g = torch.Generator().manual_seed(0)
    draws = [t for _ in range(40) for t in generate(model, [0], 10, temperature=2.0, top_k=3, generator=g)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    want = torch.softmax(bias[:3] / 2.0, 0)
    assert freq[3] == 0
    assert (freq[:3] - want).abs().max() < 4 * math.sqrt(0.25 / len(draws))


def test_eos_stops_and_is_not_returned():
    model = build()
    prompt = [5, 6, 7]
    free = generate(model, prompt, 12)
    eos = free[4]
    stopped = generate(model, prompt, 12, eos_id=eos)
    assert stopped == free[:free.index(eos)]


def test_long_prompt_keeps_its_newest_tokens():
    model = build()
    prompt = torch.randint(0, CFG.vocab_size, (60,)).tolist()   # longer than max_seq_len=48
    out = generate(model, prompt, 8)
    assert out == generate(model, prompt[-(48 - 8):], 8)
    with torch.no_grad():
        assert out == greedy_without_cache(model, prompt[-40:], 8)
    # More new tokens than the window holds: a one-token prompt, stopping when the window is full.
    assert len(generate(model, prompt, 100)) == 48
