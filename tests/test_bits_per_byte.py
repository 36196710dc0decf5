"""Bits per byte: the tokenizer-independent loss, on cases with a known answer.

The byte table is checked against the text itself (decoded by transformers, an independent
implementation) for the three token spellings stagewise meets: its own byte-level BPE, a
SentencePiece-style vocabulary with byte fallback (Llama 2 / Gemma) and a byte-level BPE with
special tokens (Qwen). Bits per byte is checked on a model whose loss is known exactly.
"""

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from stagewise.data.tokenizer import Tokenizer, train_bpe
from stagewise.eval import evaluate
from stagewise.objectives import IGNORE_INDEX, Batch

transformers = pytest.importorskip("transformers")

TEXTS = ["def f(x):\n    return x  # café", "héllo wörld, 漢字 and an emoji 🙂!", "  two  spaces\tand tab\n\n",
         "the theme then"]


def _sentencepiece_style() -> HFTokenizer:
    """A Gemma-like vocabulary: U+2581 for spaces, <0xAB> byte-fallback tokens, specials first."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("(),:#.!\n\t") + ["th", "the",
                                                                                                   "\u2581the"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("t", "h"), ("th", "e"), ("\u2581", "the")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(specials)
    return tok


def _qwen_style(corpus_dir) -> HFTokenizer:
    tok = train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 400).backend
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


@pytest.fixture(params=["byte-level", "sentencepiece", "qwen-special"])
def tokenizer(request, corpus_dir, tmp_path):
    if request.param == "byte-level":
        hf = train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 400).backend
    elif request.param == "sentencepiece":
        hf = _sentencepiece_style()
        hf.add_special_tokens(["<|endoftext|>"])  # stagewise needs a document separator it can find
    else:
        hf = _qwen_style(corpus_dir)
    hf.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.load(tmp_path / "tokenizer.json"), tmp_path / "tokenizer.json"


def test_token_bytes_sum_to_the_decoded_text(tokenizer):
    tok, path = tokenizer
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXTS:
        ids = tok.encode(text)
        decoded = reference.decode(ids)
        assert decoded == text  # every case round-trips, so the text's byte length is the answer
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_special_tokens_stand_for_no_bytes(tokenizer):
    tok, _ = tokenizer
    spec = json.loads(tok.backend.to_str())
    special = [t["id"] for t in spec["added_tokens"] if t["special"]]
    assert special and all(tok.token_bytes[i] == 0 for i in special)
    assert (tok.token_bytes[[i for i in range(tok.vocab_size) if i not in special]] > 0).all()


class _Uniform(torch.nn.Module):
    """Equal logits for every token: each target costs exactly ln V nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


def test_bits_per_byte_of_a_uniform_model():
    V = 256
    token_bytes = np.arange(V, dtype=np.int64) % 4  # token i stands for i mod 4 bytes
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (3, 16), generator=g)
    targets[0, :5] = IGNORE_INDEX  # masked targets count neither loss nor bytes
    batch = Batch(torch.randint(0, V, (3, 16), generator=g), targets)
    res = evaluate(_Uniform(V), [batch], token_bytes=token_bytes)
    counted = targets[targets != IGNORE_INDEX]
    n_bytes = int((counted % 4).sum())
    assert res["tokens"] == counted.numel() and res["bytes"] == n_bytes
    # n tokens, each log2(V) = 8 bits, over n_bytes bytes.
    assert res["bits_per_byte"] == pytest.approx(counted.numel() * math.log2(V) / n_bytes, rel=1e-6)
    assert res["loss"] == pytest.approx(math.log(V), rel=1e-6)


def test_training_logs_bits_per_byte_beside_the_loss(tmp_path, corpus_dir, data_cache):
    from conftest import tiny_recipe
    from stagewise.config.loader import load_recipe
    from stagewise.data import eval_batches, open_dataset
    from stagewise.rundir import read_metrics
    from stagewise.train.runner import start as train

    cfg = load_recipe(tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs"),
                      ["--train.steps=10", "--checkpoint.every=0"])
    run_dir = train(cfg, log=lambda *a: None)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert evals and all("val_bpb" in r for r in evals)
    info = json.loads((run_dir / "run_info.json").read_text())
    ds = open_dataset(info["dataset"])
    windows = eval_batches(ds.val, cfg.data.seq_len, cfg.train.batch_size, cfg.eval.batches)
    n_tokens = sum(y.numel() for _, y in windows)
    n_bytes = sum(int(ds.tokenizer.token_bytes[y.numpy()].sum()) for _, y in windows)
    last = evals[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * n_tokens / (math.log(2) * n_bytes), rel=1e-9)
