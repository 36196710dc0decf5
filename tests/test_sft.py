"""Supervised fine-tuning: packing, the SFT losses, the stage kind end to end, exact resume and
every bad input."""

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from stagewise.config.schema import ModelConfig
from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.data.packing import PackedSource, PaddedSource, best_fit_decreasing, eval_rows, packed_row
from stagewise.data.sft_data import Example, fit_length
from stagewise.errors import DataError
from stagewise.model import Transformer
from stagewise.objectives.sft import SFT
from stagewise.rundir import read_metrics

TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes"}


def _examples(lengths, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, vocab, n + 1)
        targets = ids[1:].copy()
        targets[: n // 2] = IGNORE_INDEX  # a prompt half that takes no loss
        out.append(Example(ids[:-1], targets, f"ex:{i}"))
    return out


def test_best_fit_decreasing_known_case():
    # Longest first, each into the fullest bin that still holds it: 7 | 6+4 | 5+5 | 3 ... capacity 10.
    lengths = [5, 7, 3, 6, 4, 5, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert [[lengths[i] for i in b] for b in bins] == [[7, 3], [6, 4], [5, 5], [2]]
    assert len(bins) == math.ceil(sum(lengths) / 10)  # optimal here


def test_packed_row_layout():
    ex = _examples([3, 4])
    row = packed_row(ex, 10, pad_id=0)
    assert row["doc_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
    assert row["inputs"][:3].tolist() == ex[0].inputs.tolist() and (row["inputs"][7:] == 0).all()
    assert (row["targets"][7:] == IGNORE_INDEX).all()


def test_packed_batch_loss_equals_examples_alone():
    """The packer plus document-aware attention: the summed loss and the gradient of a packed batch
    equal those of every example run alone (fp32)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    examples = _examples([9, 17, 5, 12, 20, 3, 8], vocab=64)
    src = PackedSource(examples, 32, 2, seed=1, pad_id=0)
    batch = src.next()
    assert batch.inputs.shape == (2, 32) and batch.doc_ids is not None
    rows = [[int(i) for i in r] for r in src._epoch_layout()[0]]
    packed = model(batch.inputs, targets=batch.targets, positions=batch.positions, doc_ids=batch.doc_ids)
    g_packed = torch.autograd.grad(packed, model.layers[0].attention.wq.weight)[0]
    alone = sum(model(torch.from_numpy(examples[i].inputs)[None], targets=torch.from_numpy(examples[i].targets)[None])
                for r in rows for i in r)
    g_alone = torch.autograd.grad(alone, model.layers[0].attention.wq.weight)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_packed, g_alone, rtol=1e-4, atol=1e-6)


def test_sources_resume_and_cover_an_epoch():
    examples = _examples([5 + (i * 7) % 23 for i in range(40)])
    for kind in (PackedSource, PaddedSource):
        a = kind(examples, 32, 2, seed=3, pad_id=0)
        seen = [a.next() for _ in range(3)]
        state = json.loads(json.dumps(a.state_dict()))
        expect = [a.next() for _ in range(30)]  # crosses into the next epoch
        b = kind(examples, 32, 2, seed=3, pad_id=0)
        b.load_state_dict(state)
        for x, y in zip(expect, (b.next() for _ in range(30))):
            assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
        assert seen  # three batches were drawn before the state was taken
    # one epoch of packed rows holds every example exactly once (the batch remainder aside)
    src = PackedSource(examples, 32, 1, seed=3, pad_id=0)
    used = [i for group in src._epoch_layout() for row in group for i in row]
    assert sorted(used) == list(range(len(examples)))


def test_padding_fraction_known_answer():
    # Padded: 4 examples of 10 tokens -> one batch of 4 rows padded to 32: 1 - 40 / 128.
    src = PaddedSource(_examples([10, 10, 10, 10]), 64, 4, seed=0, pad_id=0)
    assert src.padding_fraction() == pytest.approx(1 - 40 / 128)
    # Packed: 3 x 10 tokens in one row of 32 (batch 1): 1 - 30 / 32.
    assert PackedSource(_examples([10, 10, 10]), 32, 1, seed=0, pad_id=0).padding_fraction() == \
        pytest.approx(1 - 30 / 32)


def test_truncation_policies():
    ex = _examples([40])[0]  # its first 20 targets take no loss
    assert len(fit_length(ex, 30, "truncate").inputs) == 30
    assert fit_length(ex, 16, "truncate") is None  # nothing left to train on
    assert fit_length(ex, 16, "drop") is None and fit_length(ex, 40, "error") is ex
    with pytest.raises(DataError, match=r"ex:0: the conversation is 41 tokens.*sft.truncation"):
        fit_length(ex, 16, "error")


def _manual(model, ref, batch, loss, kl_weight):
    """DFT / ASFT written out on full float64 logits."""
    logp = F.log_softmax(model(batch.inputs).double(), -1)
    valid = batch.targets != IGNORE_INDEX
    t = batch.targets.clamp(min=0)
    lp = logp.gather(-1, t[..., None]).squeeze(-1)[valid]
    out = -(lp.detach().exp() * lp).sum()
    if loss == "asft":
        logq = F.log_softmax(ref(batch.inputs).double(), -1)[valid]
        out = out + kl_weight * (logq.exp() * (logq - logp[valid])).sum()
    return out


@pytest.mark.parametrize("loss", ["dft", "asft"])
def test_dft_and_asft_match_their_definitions(loss):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, tie_embeddings=False)
    model, ref = Transformer(cfg), Transformer(cfg)
    ref.requires_grad_(False)
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    y[:, :5] = IGNORE_INDEX
    batch = Batch(x, y)
    out = SFT(loss, kl_weight=0.3, reference=ref)(model, batch)
    want = _manual(model, ref, batch, loss, 0.3)
    assert int(out.normaliser) == int((y != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.loss_sum.double(), want, rtol=1e-5, atol=1e-5)
    params = [model.output.weight, model.layers[0].feed_forward.w1.weight]
    got = torch.autograd.grad(out.loss_sum, params)
    ref_grads = torch.autograd.grad(want, params)
    for g, r in zip(got, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    if loss == "asft":  # the KL of a model to itself is 0, so asft then equals dft
        same = SFT("asft", kl_weight=5.0, reference=model)(model, batch)
        assert float(same.metrics["sft/kl"]) == pytest.approx(0.0, abs=1e-5)


def test_dft_on_hand_built_probabilities():
    """A 'model' whose next-token distribution is fixed: p(target) = 0.5 and 0.25 -> DFT loss
    0.5 ln 2 + 0.25 ln 4 = ln 2 over 2 tokens, the CE loss would be 3 ln 2."""

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]])))

        def token_logprobs(self, inputs, targets):
            lp = F.log_softmax(self.logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            return torch.where(targets != IGNORE_INDEX, lp, 0.0)

    import stagewise.objectives.sft as sft_mod

    batch = Batch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]))
    orig = sft_mod.token_model
    sft_mod.token_model = lambda m: m
    try:
        out = SFT("dft")(Fixed(), batch)
    finally:
        sft_mod.token_model = orig
    assert float(out.loss_sum) == pytest.approx(math.log(2), rel=1e-6)
    assert float(out.metrics["sft/mean_p"]) == pytest.approx(0.75, rel=1e-6)


def test_eval_rows_are_fixed_and_cover_examples():
    examples = _examples([10, 12, 30, 5, 7])
    a, b = eval_rows(examples, 32, 2, 4, 0), eval_rows(examples, 32, 2, 4, 0)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b))
    counted = sum(int((bt.targets != IGNORE_INDEX).sum()) for bt in a)
    assert counted == sum(int((e.targets != IGNORE_INDEX).sum()) for e in examples)


@pytest.mark.parametrize("mode,bf16_gemm", [("fp8", "auto"), ("int4", "auto"),
                                            ("bf16-pure", "native"), ("bf16-pure", "emulate")])
def test_precision_setup_leaves_named_modules_alone(mode, bf16_gemm, monkeypatch):
    """The precision swaps skip modules named in `keep` (adapters will keep their own weights); under
    bf16-pure a kept fp32 module computes in fp32 between bf16 neighbours, on CPUs with a native bf16
    GEMM (where a dtype mismatch raises) as on those that emulate it."""
    from stagewise.config.schema import PrecisionConfig
    from stagewise.precision import cpu_bf16
    if bf16_gemm != "auto":
        monkeypatch.setenv(cpu_bf16.ENV, bf16_gemm)
    cpu_bf16.native_bf16_gemm.cache_clear()
    try:
        _kept_modules_train(mode)
    finally:
        monkeypatch.delenv(cpu_bf16.ENV, raising=False)
        cpu_bf16.native_bf16_gemm.cache_clear()


def _kept_modules_train(mode):
    from stagewise.config.schema import PrecisionConfig
    from stagewise.objectives import CausalLM
    from stagewise.precision import build_precision
    from stagewise.train.step import train_step

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))
    prec = build_precision(PrecisionConfig(mode=mode), torch.device("cpu"))
    model = prec.setup(model, keep=["layers.1.*"])
    kept = model.layers[1].attention.wq
    changed = model.layers[0].attention.wq
    assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.float32
    assert type(changed) is not torch.nn.Linear or changed.weight.dtype == torch.bfloat16
    opt = prec.setup_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    x = torch.randint(0, 64, (2, 16))
    before = kept.weight.detach().clone()
    r = train_step(model, opt, prec, CausalLM(), [Batch(x, torch.roll(x, -1, 1))], 1e-3, 1.0).host()
    assert math.isfinite(r.loss) and r.applied
    assert kept.weight.dtype == torch.float32 and not torch.equal(kept.weight.detach(), before)
