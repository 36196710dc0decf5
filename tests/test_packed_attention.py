"""Packed rows (Transformer.forward / token_logprobs with positions and doc_ids) against the
independent reference of running each document alone, unpacked: block-causal attention and
per-document RoPE positions must make packing invisible to every document."""

from dataclasses import replace

import pytest
import torch

from stagewise.config.schema import ModelConfig
from stagewise.model.llama import KVCache, Transformer, document_positions
from stagewise.model.loss import IGNORE_INDEX

LLAMA = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=64, init_std=0.1)
GQA_QK_NORM = replace(LLAMA, n_kv_heads=2, qk_norm=True)
# Gemma-3-like: local layers with a window shorter than the documents, a global layer, their own
# RoPE base, and the rest of Gemma's options.
GEMMA = replace(LLAMA, n_layers=3, n_kv_heads=2, qk_norm=True, sliding_window=4, global_every=3,
                rope_local_base=100.0, norm_unit_offset=True, post_norms=True, scale_embeddings=True,
                query_pre_attn_scalar=24.0, mlp_activation="gelu_tanh")
CONFIGS = {"llama": LLAMA, "gqa_qk_norm": GQA_QK_NORM, "gemma3_like": GEMMA}

# Two rows of 18 tokens: documents of 5, 9 and 4 tokens; of 11 and 3 tokens then 4 of padding
# (a document of its own: its attention stays among the padding).
ROWS = [[5, 9, 4], [11, 3, 4]]
PAD_LEN = {1: 4}  # row -> length of trailing padding


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def packed_batch(seed=0):
    """tokens, positions, doc_ids [2, 18] and the list of (row, start, length) real documents."""
    g = torch.Generator().manual_seed(seed)
    tokens, positions, doc_ids, docs = [], [], [], []
    for r, lengths in enumerate(ROWS):
        tok, pos, ids, s = [], [], [], 0
        for k, n in enumerate(lengths):
            is_pad = PAD_LEN.get(r) == n and k == len(lengths) - 1
            tok += [0] * n if is_pad else torch.randint(1, 96, (n,), generator=g).tolist()
            pos += list(range(n))
            ids += [k] * n
            if not is_pad:
                docs.append((r, s, n))
            s += n
        tokens.append(tok), positions.append(pos), doc_ids.append(ids)
    return torch.tensor(tokens), torch.tensor(positions), torch.tensor(doc_ids), docs


def next_token_targets(tokens, docs):
    """Each document's next tokens; IGNORE_INDEX at its last token and on padding."""
    targets = torch.full_like(tokens, IGNORE_INDEX)
    for r, s, n in docs:
        targets[r, s:s + n - 1] = tokens[r, s + 1:s + n]
    return targets


def test_document_positions_restart_per_document():
    _, positions, doc_ids, _ = packed_batch()
    assert torch.equal(document_positions(doc_ids), positions)
    assert torch.equal(document_positions(torch.tensor([[7, 7, 3, 3, 3, 7]])), torch.tensor([[0, 1, 0, 1, 2, 0]]))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("give_positions", [True, False])
def test_packed_logits_equal_each_document_alone(name, give_positions):
    model = build(CONFIGS[name])
    tokens, positions, doc_ids, docs = packed_batch()
    with torch.no_grad():
        packed = model(tokens, positions=positions if give_positions else None, doc_ids=doc_ids)
        for r, s, n in docs:
            alone = model(tokens[r:r + 1, s:s + n])[0]
            torch.testing.assert_close(packed[r, s:s + n], alone, atol=1e-5, rtol=0)


def test_positions_alone_only_move_rope():
    """Without doc_ids the row stays one causal sequence and positions only feed RoPE, whose
    attention scores depend on position differences alone: shifting every position by the same
    offset leaves the logits unchanged (up to rounding), other positions change them."""
    model = build(GEMMA)
    tokens = packed_batch()[0]
    T = tokens.shape[1]
    with torch.no_grad():
        plain = model(tokens)
        torch.testing.assert_close(model(tokens, positions=torch.arange(T).expand(2, T)), plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(tokens, positions=torch.arange(7, 7 + T).expand(2, T)), plain,
                                   atol=1e-5, rtol=0)
        spread = model(tokens, positions=(2 * torch.arange(T)).expand(2, T))
    assert (spread - plain).abs().max() > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_gradient_equals_sum_over_documents_alone(name):
    """The summed loss of the packed batch and the sum of the documents' own losses have the same
    gradient: nothing flows between documents, and everything flows within them."""
    tokens, positions, doc_ids, docs = packed_batch()
    targets = next_token_targets(tokens, docs)
    packed_model, alone_model = build(CONFIGS[name]), build(CONFIGS[name])
    packed_model.train(), alone_model.train()
    packed_model(tokens, targets=targets, positions=positions, doc_ids=doc_ids).backward()
    for r, s, n in docs:
        alone_model(tokens[r:r + 1, s:s + n], targets=targets[r:r + 1, s:s + n]).backward()
    for (name_, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name_
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name_)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_token_logprobs_equal_each_document_alone(fused):
    model = build(GEMMA)
    model.fused_loss = fused
    tokens, positions, doc_ids, docs = packed_batch()
    targets = next_token_targets(tokens, docs)
    with torch.no_grad():
        packed = model.token_logprobs(tokens, targets, positions=positions, doc_ids=doc_ids)
        assert packed.shape == tokens.shape and packed.dtype == torch.float32
        assert torch.all(packed[targets == IGNORE_INDEX] == 0)
        for r, s, n in docs:
            alone = model.token_logprobs(tokens[r:r + 1, s:s + n], targets[r:r + 1, s:s + n])[0]
            torch.testing.assert_close(packed[r, s:s + n], alone, atol=1e-5, rtol=0)


def test_packing_with_a_kv_cache_is_refused():
    model = build(LLAMA)
    tokens, positions, doc_ids, _ = packed_batch()
    cache = KVCache.for_model(model, batch_size=2)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens, cache=cache, doc_ids=doc_ids)
    with pytest.raises(ValueError, match="KV cache"):
        model(tokens, cache=cache, positions=positions)
    assert cache.pos == 0


def test_compiled_blocks_take_the_block_causal_mask():
    """compile_blocks with a [B, 1, T, T] boolean mask and [B, T, hd] RoPE tables: the same
    logits and gradients as the eager blocks."""
    tokens, positions, doc_ids, docs = packed_batch()
    targets = next_token_targets(tokens, docs)
    eager, compiled = build(replace(GEMMA, n_layers=2, global_every=2)), \
        build(replace(GEMMA, n_layers=2, global_every=2))
    compiled.compile_blocks()
    losses = [m(tokens, targets=targets, positions=positions, doc_ids=doc_ids) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-5)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
