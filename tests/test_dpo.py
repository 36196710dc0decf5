"""Preference optimisation: every loss and its gradient against TRL's own code on the same log-probs,
sequence log-probs against a full-logits computation, the three references against each other, and
the preference data (rows, built-in sets, packing) on cases with a known answer."""

import types
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stagewise.config.schema import ModelConfig
from stagewise.data.batch import IGNORE_INDEX
from stagewise.data.preference import Unit, arithmetic_rows, row_from_dict, wrong_answer
from stagewise.data.preference_batches import PreferenceSource, pack_units, padded_batch
from stagewise.data.sft_data import Example
from stagewise.errors import DataError
from stagewise.model import Transformer
from stagewise.objectives.preference import Preference, kto_losses, pair_losses, sequence_logps

trl = pytest.importorskip("trl")


# ------------------------------------------------------------------ TRL's loss code on our log-probs

class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m):
        return m


def _trainer_namespace(**kw):
    ns = types.SimpleNamespace(accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
                               precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                               _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                               _total_train_tokens=0, _tp_size=1, ref_model=None, label_smoothing=0.0,
                               args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    ns.model = types.SimpleNamespace(training=True)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


class _FakeModel:
    """Returns the given per-token log-probs as a fused-head output (TRL's `fused_lm_head=True`)."""

    def __init__(self, per_token, kl=None, kl_ids=None):
        self.per_token, self.kl, self.kl_ids = per_token, kl, kl_ids

    def __call__(self, input_ids=None, **kw):
        lp = self.kl if self.kl_ids is not None and input_ids is self.kl_ids else self.per_token
        z = torch.zeros_like(lp)
        return types.SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def _pairs(seed=0, P=5, T=9, equal_lengths=False):
    """Per-token log-probs [2P, T-1] (chosen rows then rejected rows, TRL's order), their completion mask
    [2P, T] and reference sums."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for i in range(2 * P):
        start = 2 + (0 if equal_lengths else int(torch.randint(0, 3, (1,), generator=g)))
        n = 4 if equal_lengths else int(torch.randint(1, T - start, (1,), generator=g))
        mask[i, start:start + n] = 1
    tok = (-torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64) * 2) * mask[:, 1:]
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 6
    return tok.requires_grad_(True), mask, ref


def _ours(loss, tok, mask, ref, beta, **kw):
    sums, lens = tok.sum(1), mask[:, 1:].sum(1).double()
    P = tok.shape[0] // 2
    per, _, _ = pair_losses(loss, beta, sums[:P], sums[P:], ref[:P], ref[P:], lens[:P], lens[P:], **kw)
    return per


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_pair_losses_and_gradients_equal_trls(loss):
    from trl import DPOTrainer

    beta, eps = 0.3, 0.2
    tok, mask, ref = _pairs(seed=hash(loss) % 1000)
    P = tok.shape[0] // 2
    ns = _trainer_namespace(loss_types=[loss], loss_weights=[1.0], beta=beta, label_smoothing=eps)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:P], "ref_rejected_logps": ref[P:]}
    theirs = DPOTrainer._compute_loss(ns, _FakeModel(tok), inputs, False)
    (g_theirs,) = torch.autograd.grad(theirs, tok)
    ours = _ours(loss, tok, mask, ref, beta, label_noise=eps).sum() / P
    (g_ours,) = torch.autograd.grad(ours, tok)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (float(ours), float(theirs))
    assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-14)
    sums, lens = tok.sum(1), mask[:, 1:].sum(1).double()
    _, rc, rr = pair_losses(loss, beta, sums[:P], sums[P:], ref[:P], ref[P:], lens[:P], lens[P:], label_noise=eps)
    logged = ns._metrics["train"]
    assert abs(logged["rewards/accuracies"][0] - float((rc > rr).double().mean())) < 1e-6
    assert abs(logged["rewards/margins"][0] - float((rc - rr).mean())) < 1e-6
    assert abs(logged["rewards/chosen"][0] - float(rc.mean())) < 1e-6


def test_sft_weight_is_trls_sft_term_on_equal_lengths():
    """RPO's NLL term: per pair, the chosen response's mean token NLL; TRL's `sft` loss is the mean over
    the batch's chosen tokens, the same number when every chosen response has one length."""
    from trl import DPOTrainer

    tok, mask, ref = _pairs(seed=3, equal_lengths=True)
    P = tok.shape[0] // 2
    ns = _trainer_namespace(loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.7], beta=0.1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:P], "ref_rejected_logps": ref[P:]}
    theirs = DPOTrainer._compute_loss(ns, _FakeModel(tok), inputs, False)
    sums, lens = tok.sum(1), mask[:, 1:].sum(1).double()
    ours = (_ours("sigmoid", tok, mask, ref, 0.1) + 0.7 * (-sums[:P] / lens[:P])).sum() / P
    g1, g2 = torch.autograd.grad(theirs, tok)[0], torch.autograd.grad(ours, tok)[0]
    m = mask[:, 1:]  # a model's log-prob of a masked position is a constant 0: only trained tokens have gradients
    assert torch.allclose(ours, theirs, atol=1e-12) and torch.allclose(g1 * m, g2 * m, atol=1e-12)


def test_simpo_equals_trls_cpo_simpo():
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.8
    tok, mask, ref = _pairs(seed=5)
    P = tok.shape[0] // 2
    sums, lens = tok.sum(1), mask[:, 1:].sum(1).double()
    ns = _trainer_namespace(loss_type="simpo", alpha=0.0, beta=beta, simpo_gamma=gamma)
    theirs, rc, rr = CPOTrainer.cpo_loss(ns, sums[:P] / lens[:P], sums[P:] / lens[P:])
    theirs = theirs.mean()
    ours = _ours("simpo", tok, mask, ref, beta, gamma=gamma).sum() / P
    g1, g2 = torch.autograd.grad(theirs, tok)[0], torch.autograd.grad(ours, tok)[0]
    assert torch.allclose(ours, theirs, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)
    _, oc, orr = pair_losses("simpo", beta, sums[:P], sums[P:], None, None, lens[:P], lens[P:], gamma=gamma)
    assert torch.allclose(oc, rc) and torch.allclose(orr, rr)


def test_orpo_equals_trls_odds_ratio_loss_plus_nll():
    """ORPO = NLL - lambda * log sigmoid(log odds ratio) on per-token mean log-probs; TRL's NLL is the
    cross-entropy mean over the batch's chosen tokens (equal lengths here, so per pair is the same)."""
    from trl.experimental.orpo import ORPOTrainer

    lam = 0.25
    tok, mask, ref = _pairs(seed=7, equal_lengths=True)
    P = tok.shape[0] // 2
    sums, lens = tok.sum(1), mask[:, 1:].sum(1).double()
    ns = _trainer_namespace(beta=lam)
    ratio_losses = ORPOTrainer.odds_ratio_loss(ns, sums[:P] / lens[:P], sums[P:] / lens[P:])[0]
    nll = -(tok[:P].sum() / mask[:P, 1:].sum())
    theirs = nll - ratio_losses.mean()
    ours = _ours("orpo", tok, mask, ref, lam).sum() / P
    g1, g2 = torch.autograd.grad(theirs, tok)[0], torch.autograd.grad(ours, tok)[0]
    m = mask[:, 1:]
    assert torch.allclose(ours, theirs.double(), atol=1e-6) and torch.allclose(g1 * m, g2 * m, atol=1e-6)


def test_kto_equals_trls():
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(11)
    n, T = 6, 8
    mask = torch.zeros(n, T, dtype=torch.long)
    mask[:, 3:7] = 1
    tok = (-torch.rand(n, T - 1, generator=g, dtype=torch.float64) * 2 * mask[:, 1:]).requires_grad_(True)
    kl_tok = -torch.rand(n, T - 1, generator=g, dtype=torch.float64) * mask[:, 1:]
    ref, ref_kl = -torch.rand(n, generator=g, dtype=torch.float64) * 8, -torch.rand(n, generator=g,
                                                                                     dtype=torch.float64) * 8
    labels = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    kl_ids = torch.ones_like(mask)
    ns = _trainer_namespace(calculate_KL=True, loss_type="kto", beta=0.2, desirable_weight=1.3,
                            undesirable_weight=0.8)
    ns._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, ns)
    batch = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
             "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    theirs = KTOTrainer._compute_loss(ns, _FakeModel(tok, kl_tok, kl_ids), batch, False)
    per, rewards, z0 = kto_losses(0.2, tok.sum(1), ref, kl_tok.sum(1), ref_kl, labels.double(), 1.3, 0.8)
    ours = per.sum() / n
    g1, g2 = torch.autograd.grad(theirs, tok)[0], torch.autograd.grad(ours, tok)[0]
    assert torch.allclose(ours, theirs, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)
    assert abs(float(z0) - ns._metrics["train"]["kl"][0]) < 1e-12


def test_dpo_loss_is_ln2_when_policy_is_the_reference():
    tok, mask, ref = _pairs(seed=1)
    P = tok.shape[0] // 2
    sums = tok.sum(1).detach()
    per = _ours("sigmoid", tok, mask, sums, 0.1)  # reference == policy: every log-ratio is 0
    assert torch.allclose(per, torch.full((P,), np.log(2), dtype=per.dtype))


# ------------------------------------------------------------------------- sequence log-probs

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    m.init_weights()
    return m.eval()


def _units(n=5, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seqs = []
        for _ in range(2):
            L = int(rng.integers(6, 20))
            ids = rng.integers(3, vocab, L + 1)
            p = int(rng.integers(2, L - 1))  # prompt tokens take no loss
            targets = np.where(np.arange(L) >= p, ids[1:], IGNORE_INDEX)
            seqs.append(Example(ids[:-1].astype(np.int64), targets.astype(np.int64), f"u{i}"))
        out.append(Unit(tuple(seqs), 1.0, f"u{i}"))
    return out


def _full_logits_logps(model, units):
    out = []
    with torch.no_grad():
        for u in units:
            for ex in u.seqs:
                logits = model(torch.from_numpy(ex.inputs)[None]).float()[0]
                lp = F.log_softmax(logits, -1)
                t = torch.from_numpy(ex.targets)
                keep = t != IGNORE_INDEX
                out.append(lp[keep].gather(1, t[keep][:, None]).sum())
    return torch.stack(out)


def test_sequence_logps_packed_and_padded_equal_full_logits():
    model, units = _tiny_model(), _units()
    want = _full_logits_logps(model, units)
    padded = sequence_logps(model, padded_batch(units, 64, 0))[0]
    index, rows = pack_units([u.lengths() for u in units], list(range(len(units))), 2, 64)[0]
    assert index == list(range(len(units)))  # 5 units of <= 40 tokens fit two 64-token rows
    from stagewise.data.preference_batches import _batch

    packed_batch = _batch(units, rows, 64, 0, None, index, True)
    packed = sequence_logps(model, packed_batch)[0]
    assert torch.allclose(padded, want, atol=1e-4) and torch.allclose(packed, want, atol=1e-4)
    import dataclasses

    every_row = sequence_logps(model, dataclasses.replace(packed_batch, target_rows=None))[0]
    assert torch.allclose(every_row, packed, atol=1e-5)  # scoring only the trained rows changes nothing
    assert packed_batch.target_rows.numel() == int((packed_batch.seq_ids >= 0).sum())
    assert packed_batch.inputs.shape == (2, 64) and padded_batch(units, 64, 0).inputs.shape[0] == 10


def test_pack_units_keeps_units_whole_and_rows_within_seq_len():
    rng = np.random.default_rng(0)
    lengths = [(int(rng.integers(5, 60)), int(rng.integers(5, 60))) for _ in range(200)]
    batches = pack_units(lengths, list(range(200)), 4, 64)
    seen = []
    for index, rows in batches:
        seen += index
        assert len(rows) == 4
        for row in rows:
            assert sum(lengths[index[u]][s] for u, s in row) <= 64
        placed = sorted((u, s) for row in rows for u, s in row)
        assert placed == [(u, s) for u in range(len(index)) for s in (0, 1)]  # both sequences of every unit
    assert seen == list(range(200))


def test_preference_source_resumes_exactly():
    units = _units(40, seed=2)
    for packed in (True, False):
        a = PreferenceSource(units, 64, 3, seed=5, pad_id=0, packed=packed)
        first = [a.next() for _ in range(9)]
        b = PreferenceSource(units, 64, 3, seed=5, pad_id=0, packed=packed)
        for _ in range(4):
            b.next()
        c = PreferenceSource(units, 64, 3, seed=5, pad_id=0, packed=packed)
        c.load_state_dict(b.state_dict())
        for want in first[4:]:
            got = c.next()
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.seq_ids, want.seq_ids)


# ---------------------------------------------------------------------------------- references

def test_adapters_off_reference_equals_a_frozen_copy():
    """A LoRA policy (trained adapters, and a base-moving pissa init) with its adapters off computes the
    log-probs of the untouched base model."""
    from stagewise.adapters.apply import adapters, attach, init_from_weights, match_targets, settle
    from stagewise.config.schema import AdapterConfig
    from stagewise.train.dpo_kind import AdaptersOffReference, CopyReference

    units = _units(4, seed=3)
    batch = padded_batch(units, 64, 0)
    for init in ("default", "pissa"):
        base = _tiny_model(seed=1)
        policy = _tiny_model(seed=1)
        cfg = AdapterConfig(kind="lora", r=4, init=init)
        names = attach(policy, cfg, {n: 4 for n in match_targets(policy, ["all-linear"])})
        for layer in adapters(policy).values():
            if init == "pissa":
                init_from_weights(layer, "pissa")
        settle(policy, cfg, None)
        with torch.no_grad():
            for layer in adapters(policy).values():  # as if trained: B no longer zero
                layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
        assert names
        copy = CopyReference()
        copy.model = base
        trained = sequence_logps(policy, batch)[0]
        off = AdaptersOffReference().logps(policy, batch)
        frozen = copy.logps(None, batch)
        assert torch.allclose(off, frozen, atol=1e-5), (init, off - frozen)
        assert not torch.allclose(trained, frozen, atol=1e-3)  # the adapters do change the policy
        assert torch.allclose(sequence_logps(policy, batch)[0], trained)  # and are back on afterwards


def test_precomputed_reference_equals_on_the_fly():
    from stagewise.precision import build_precision
    from stagewise.config.schema import PrecisionConfig
    from stagewise.train.dpo_kind import CopyReference, PrecomputedReference, precompute_logps

    model, units = _tiny_model(seed=4), _units(12, seed=4)
    precision = build_precision(PrecisionConfig(mode="fp32"), torch.device("cpu"), 0)
    table = precompute_logps(model, units, precision, torch.device("cpu"), 5, 64, 0)
    source = PreferenceSource(units, 64, 2, seed=0, pad_id=0, packed=True)
    source.ref = table
    copy = CopyReference()
    copy.model = model
    for _ in range(4):
        b = source.next()
        assert torch.allclose(PrecomputedReference().logps(None, b), copy.logps(None, b), atol=1e-5)


def test_objective_metrics_on_a_known_case():
    """Policy == reference: every reward 0, loss ln 2, accuracy 0 (no pair has chosen > rejected)."""
    from stagewise.train.dpo_kind import CopyReference

    model, units = _tiny_model(seed=2), _units(3, seed=9)
    copy = CopyReference()
    copy.model = model
    out = Preference("sigmoid", 0.1, copy)(model, padded_batch(units, 64, 0))
    assert abs(float(out.loss_sum.detach()) / 3 - np.log(2)) < 1e-6 and int(out.normaliser) == 3
    assert float(out.metrics["rewards/accuracies"]) == 0 and abs(float(out.metrics["rewards/margins"])) < 1e-6
    want = _full_logits_logps(model, units)
    assert abs(float(out.metrics["logps/chosen"]) - float(want[0::2].sum())) < 1e-4


# ----------------------------------------------------------------------------------------- data

def test_rows_paired_implicit_prompt_and_unpaired():
    r = row_from_dict({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "f:1")
    assert r.prompt == [{"role": "user", "content": "2+2="}] and r.first[-1]["content"] == "4" and r.paired
    conv = [{"role": "user", "content": "hi"}]
    r = row_from_dict({"chosen": conv + [{"role": "assistant", "content": "hello"}],
                       "rejected": conv + [{"role": "assistant", "content": "go away"}]}, "f:2")
    assert r.prompt == conv and r.second == [{"role": "assistant", "content": "go away"}]
    r = row_from_dict({"prompt": "q", "completion": "a", "label": False}, "f:3")
    assert not r.paired and r.label is False


@pytest.mark.parametrize("row,pattern", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"f:4: chosen and rejected are the same"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, r"f:4: chosen is an empty response"),
    ({"prompt": "q", "chosen": "a"}, r"f:4: no field 'rejected'"),
    ({"prompt": "q", "completion": "a"}, r"f:4: no field 'label'"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, r"f:4: label must be true"),
    ({"text": "q"}, r"f:4: cannot tell the row's format"),
])
def test_bad_rows_name_the_row(row, pattern):
    import re

    with pytest.raises(DataError) as e:
        row_from_dict(row, "f:4")
    assert re.search(pattern, str(e.value)) and "\n" not in str(e.value)


def test_arithmetic_preferences_are_verifiably_right_and_wrong():
    from stagewise.data.arithmetic import Problem, check

    rows = list(arithmetic_rows(300, 30, ("add", "mul"), (1, 3), "reversed", 0))
    assert sum(s == "val" for s, _ in rows) == 30
    for _, r in rows:
        p = Problem(**r.extra["problem"])
        assert check(r.first[0]["content"], p) and not check(r.second[0]["content"], p)
        wrong = r.extra["wrong"]
        assert wrong == wrong_answer(p) != p.value and _plausible(p, wrong), (p, wrong)
    # 128 + 367: without its carries the sum is 485
    assert _plausible(Problem(128, 367), 485) and not _plausible(Problem(128, 367), 300)


def _plausible(p, wrong: int) -> bool:
    """The value without carries (addition), one digit one off, or the value one off."""
    v = str(p.value)
    w = str(wrong)
    n = max(len(str(p.a)), len(str(p.b)))
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(p.a).zfill(n), str(p.b).zfill(n))))
    one_digit = len(w) == len(v) and sum(a != b for a, b in zip(v, w)) == 1 and all(
        abs(int(a) - int(b)) == 1 for a, b in zip(v, w) if a != b)
    return (p.op == "add" and wrong == no_carry) or one_digit or abs(wrong - p.value) == 1


def test_kto_pairs_every_prompt_with_another_completion():
    from stagewise.data.preference import _kto_units
    from stagewise.data.chat import chatml

    tok = _chatml_tokenizer()
    rows = [row_from_dict({"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0}, f"f:{i}")
            for i in range(6)]
    units, dropped = _kto_units(rows, tok, chatml(), 64, "truncate", "dpo")
    assert dropped == 0 and [u.label for u in units] == [1.0, 0.0] * 3
    for u in units:
        own, kl = u.seqs
        assert not np.array_equal(own.targets, kl.targets)  # another example's completion
        n_prompt = int(np.argmax(own.targets != IGNORE_INDEX))
        assert np.array_equal(own.inputs[:n_prompt], kl.inputs[:n_prompt])  # the same prompt


def _chatml_tokenizer():
    from stagewise.data.tokenizer import train_bpe

    return train_bpe(["q0 q1 answer 0 1 2 3 4 5 user assistant system hello " * 50], 300)


def test_step_divides_a_counted_metric_by_its_own_count():
    """kto's rewards/chosen is a mean over desirable examples: the step sums them and their count over
    the micro-batches and divides the two, not by the step's normaliser."""
    from stagewise.config.schema import PrecisionConfig
    from stagewise.data.batch import Batch
    from stagewise.objectives.base import ObjectiveOutput
    from stagewise.precision import build_precision
    from stagewise.train.step import train_step

    w = torch.nn.Parameter(torch.ones(()))

    class Obj:
        def count(self, b):
            return int(b.labels.numel())

        def __call__(self, model, b):
            want = b.labels
            value = b.inputs.float().reshape(-1)[: want.numel()]
            return ObjectiveOutput((w * value).sum(), torch.tensor(want.numel()),
                                   {"m": (value * want).sum(), "plain": value.sum()}, {"m": want.sum()})

    opt = torch.optim.SGD([w], lr=0.0)
    prec = build_precision(PrecisionConfig(mode="fp32"), torch.device("cpu"), 0)
    mbs = [Batch(torch.tensor([[2, 4, 6]]), torch.zeros(1, 3, dtype=torch.long), labels=torch.tensor([1., 0., 1.])),
           Batch(torch.tensor([[10, 20]]), torch.zeros(1, 2, dtype=torch.long), labels=torch.tensor([0., 1.]))]
    res = train_step(torch.nn.Module(), opt, prec, Obj(), mbs, 0.0, 0.0).host()
    assert res.metrics["m"] == pytest.approx((2 + 6 + 20) / 3) and res.metrics["plain"] == pytest.approx(42 / 5)


def test_docstring_preferences_reject_another_body_of_the_same_module():
    from stagewise.data.builtin_chat import python_docstring_conversations
    from stagewise.data.preference import docstring_rows

    modules = ["textwrap.py", "json/decoder.py"]
    convs = python_docstring_conversations(modules=modules)
    bodies = {c["module"]: set() for c in convs}
    for c in convs:
        bodies[c["module"]].add(c["messages"][1]["content"])
    rows = list(docstring_rows(4000, modules))
    assert len(rows) == len(convs)  # both modules have several functions: every one gets a pair
    for _, r in rows:
        chosen, rejected = r.first[0]["content"], r.second[0]["content"]
        assert chosen != rejected and rejected in bodies[r.extra["module"]]
    assert list(docstring_rows(4000, modules)) == rows  # deterministic
