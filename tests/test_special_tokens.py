"""Special tokens of imported tokenizers (eos, bos, add_bos, stop ids), against transformers itself.

Gemma-3-, Qwen2/Qwen3- and Llama-3-style tokenizers are built offline with transformers' own tokenizer
classes (GemmaTokenizer, Qwen2Tokenizer: the special-token layout of the real models, a tiny vocabulary)
or with `tokenizers` plus the side files the hub ships. The reference for every choice is transformers
loading the same directory: AutoTokenizer's eos_token_id / bos_token_id and what its encoding prepends,
GenerationConfig's eos_token_id for the stop tokens. Prepared data is compared with AutoTokenizer's
encoding of each document followed by its eos; an init_from run and import-hf carry the choice along.
Tokenizers stagewise trains keep their old behaviour and dataset cache keys.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken, pre_tokenizers, processors  # noqa: E402

from stagewise.cli import main  # noqa: E402
from stagewise.config.schema import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from stagewise.data import Tokenizer, dataset_key, open_dataset, prepare_dataset, train_bpe  # noqa: E402
from stagewise.data.shards import FORMAT_VERSION  # noqa: E402
from stagewise.data.sources import fingerprint  # noqa: E402
from stagewise.data.special_tokens import SPECIALS_FILE  # noqa: E402
from stagewise.data.tokenizer import _find_eos  # noqa: E402
from stagewise.errors import CheckpointError, DataError  # noqa: E402
from stagewise.generate import generate  # noqa: E402

TEXTS = ["def parse(args):\n    return args", "the cat sat", "x"]
# Gemma 3's layout: <pad> <eos> <bos> <unk> <mask> first; `</s>` exists but is not Gemma's end of text
# (a fixed candidate list that tries `</s>` before `<eos>` picks it); byte-fallback pieces for the rest.
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "</s>"]
END_OF_TURN = 6


def gemma_dir(d, add_bos_token=True, post_processor_bos=True):
    """tokenizer.json with (as Gemma's) or without a post-processor that prepends <bos>; add_bos_token in
    tokenizer_config.json True (as google/gemma-3 ships it), None (as transformers' save_pretrained
    writes it) or False. transformers >= 5 ignores add_bos_token when tokenizer.json is there."""
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("r", "e")]
    for piece in "▁ethinr":
        vocab.setdefault(piece, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=post_processor_bos).save_pretrained(d)
    if add_bos_token is not None:
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.update(add_bos_token=add_bos_token, add_eos_token=False)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, END_OF_TURN],
                                                          "pad_token_id": 0}))
    return d


def qwen_dir(d, instruct):
    """A Qwen2/Qwen3 tokenizer: byte-level BPE, <|endoftext|> <|im_start|> <|im_end|> after the vocabulary,
    no BOS; the instruct model's eos is <|im_end|> and it stops on either."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    endoftext, im_start, im_end = len(vocab), len(vocab) + 1, len(vocab) + 2
    vocab.update({"<|endoftext|>": endoftext, "<|im_start|>": im_start, "<|im_end|>": im_end})
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>",
                                      eos_token="<|im_end|>" if instruct else "<|endoftext|>")
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save_pretrained(d)
    eos = im_end if instruct else endoftext
    transformers.Qwen2Config(vocab_size=len(vocab), bos_token_id=endoftext, eos_token_id=eos).save_pretrained(d)
    if instruct:
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": endoftext,
                                                              "eos_token_id": [im_end, endoftext]}))
    return d


def llama3_dir(d, corpus_dir):
    """A Llama-3-style tokenizer.json whose post-processor prepends <|begin_of_text|>, with a
    tokenizer_config.json that names bos/eos but has no add_bos_token (as Meta's does)."""
    tok = train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 300).backend  # has <|endoftext|>
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"}))
    return d


CASES = {
    "gemma3-hub-config": lambda d, c: gemma_dir(d),
    "gemma3-saved-by-transformers": lambda d, c: gemma_dir(d, add_bos_token=None),
    "gemma3-add-bos-token-false": lambda d, c: gemma_dir(d, add_bos_token=False),
    "gemma3-no-bos-post-processor": lambda d, c: gemma_dir(d, post_processor_bos=False),
    "qwen2-base": lambda d, c: qwen_dir(d, instruct=False),
    "qwen3-instruct": lambda d, c: qwen_dir(d, instruct=True),
    "llama3-post-processor": llama3_dir,
}


def reference(d):
    """(AutoTokenizer, the token ids transformers' generate() stops on) for directory d."""
    auto = transformers.AutoTokenizer.from_pretrained(d)
    if (d / "generation_config.json").is_file():
        gen = transformers.GenerationConfig.from_pretrained(d).eos_token_id
    elif (d / "config.json").is_file():
        gen = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(d)).eos_token_id
    else:
        gen = None
    stops = {auto.eos_token_id} | set([gen] if isinstance(gen, int) else gen or [])
    return auto, stops


@pytest.mark.parametrize("case", CASES)
def test_special_tokens_match_transformers(case, tmp_path, corpus_dir):
    d = CASES[case](tmp_path / "tok", corpus_dir)
    ours = Tokenizer.load(d / "tokenizer.json")
    auto, stops = reference(d)
    assert ours.eos_id == auto.eos_token_id and ours.eos_token == auto.eos_token
    adds_bos = auto.bos_token_id is not None and auto("x")["input_ids"][0] == auto.bos_token_id
    assert ours.add_bos == adds_bos
    if adds_bos:
        assert ours.bos_id == auto.bos_token_id
    for text in TEXTS:  # a prompt starts exactly as transformers encodes it
        assert ours.encode_prompt(text) == auto(text)["input_ids"]
    assert ours.stop_ids[0] == ours.eos_id and set(ours.stop_ids) == stops
    if case.startswith("gemma3"):  # the fixed candidate list would have separated documents with </s>
        assert _find_eos(ours.backend, case) == GEMMA_SPECIALS.index("</s>") != ours.eos_id

    # The choice travels with tokenizer.json alone (prepared datasets, run directories, exports).
    (tmp_path / "copy").mkdir()
    ours.save(tmp_path / "copy" / "tokenizer.json")
    assert (tmp_path / "copy" / SPECIALS_FILE).is_file()
    again = Tokenizer.load(tmp_path / "copy" / "tokenizer.json")
    assert again.specials == ours.specials and again.encode_prompt(TEXTS[0]) == ours.encode_prompt(TEXTS[0])


def test_stagewise_trained_tokenizer_is_unchanged(tmp_path, corpus_dir):
    tok = train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 300)
    tok.save(tmp_path / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no side file for our own
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.eos_id, loaded.eos_token, loaded.add_bos, loaded.stop_ids) == (0, "<|endoftext|>", False, (0,))
    assert loaded.encode_prompt(TEXTS[0]) == loaded.encode(TEXTS[0])
    assert not loaded.specials.origin


def old_dataset_key(cfg: DataConfig, tokenizer: dict) -> str:
    """The cache key as stagewise computed it before special tokens were part of it."""
    sources = []
    for i, src in enumerate(cfg.sources):
        entry = {"kind": src.kind, "inputs": fingerprint(src, f"data.sources[{i}]")}
        if src.kind in ("text", "jsonl", "parquet"):
            entry.update(glob=src.glob, field=src.field if src.kind != "text" else None)
        sources.append(entry)
    identity = {"format_version": FORMAT_VERSION, "sources": sources, "tokenizer": tokenizer,
                "val_fraction": cfg.val_fraction}
    kinds = "+".join(dict.fromkeys(src.kind for src in cfg.sources))
    return f"{kinds}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}"


def test_quickstart_dataset_key_is_unchanged(tmp_path, corpus_dir):
    from stagewise.config.loader import load_recipe
    from conftest import REPO

    data = load_recipe(REPO / "recipes" / "quickstart.yaml").data
    # A BPE to be trained: its key names the special tokens it reserves, because adding the ChatML
    # pair changed every trained tokenizer (an old cache entry must not be reused for it).
    assert dataset_key(data) == old_dataset_key(data, {"vocab_size": data.tokenizer.vocab_size,
                                                       "train_bytes": data.tokenizer.train_bytes,
                                                       "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    assert dataset_key(data) != old_dataset_key(data, {"vocab_size": data.tokenizer.vocab_size,
                                                       "train_bytes": data.tokenizer.train_bytes})
    # A tokenizer we trained, given by path (how staged recipes share one): also the old key.
    train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 300).save(tmp_path / "tokenizer.json")
    cfg = DataConfig(sources=[SourceConfig(kind="text", path=str(corpus_dir))],
                     tokenizer=TokenizerConfig(path=str(tmp_path / "tokenizer.json")))
    st = (tmp_path / "tokenizer.json").stat()
    assert dataset_key(cfg) == old_dataset_key(cfg, {"path": str((tmp_path / "tokenizer.json").resolve()),
                                                     "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def docs_dir(d, n=40):
    d.mkdir()
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat def return self in for if".split()
    for i in range(n):
        (d / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) + "\n")
    return d


def reference_stream(d, docs, val_fraction, split):
    """AutoTokenizer's encoding of each document of the split (sha256 split rule), then its eos."""
    auto = transformers.AutoTokenizer.from_pretrained(d)
    out = []
    for p in sorted(docs.iterdir()):
        u = int.from_bytes(hashlib.sha256(f"0/{p.name}".encode()).digest()[:8], "big") / 2**64
        if (u < val_fraction) == (split == "val"):
            out += auto(p.read_text())["input_ids"] + [auto.eos_token_id]
    return out


@pytest.mark.parametrize("case", ["gemma3-hub-config", "qwen3-instruct"])
def test_prepared_documents_start_and_end_as_transformers_encodes_them(case, tmp_path, corpus_dir):
    d, docs = CASES[case](tmp_path / "tok", corpus_dir), docs_dir(tmp_path / "docs")
    cfg = DataConfig(sources=[SourceConfig(kind="text", path=str(docs))],
                     tokenizer=TokenizerConfig(path=str(d / "tokenizer.json")), val_fraction=0.2)
    ds = open_dataset(prepare_dataset(cfg, tmp_path / "ds", log=lambda m: None))
    for split in ("train", "val"):
        assert getattr(ds, split).tolist() == reference_stream(d, docs, 0.2, split)
    assert (tmp_path / "ds" / SPECIALS_FILE).is_file()
    assert ds.manifest["special_tokens"]["add_bos"] == case.startswith("gemma3")
    # BOS/EOS shape the token stream, so they are part of the cache key (the old key would be stale).
    st = (d / "tokenizer.json").stat()
    old = old_dataset_key(cfg, {"path": str((d / "tokenizer.json").resolve()), "size": st.st_size,
                                "mtime_ns": st.st_mtime_ns})
    assert dataset_key(cfg) != old


def test_generation_stops_at_any_stop_token():
    from stagewise.config.schema import ModelConfig
    from stagewise.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    free = generate(model, [1, 2, 3], 20, eos_id=None)
    stop = {free[7], free[12]}
    first = min(i for i, t in enumerate(free) if t in stop)
    assert generate(model, [1, 2, 3], 20, eos_id=tuple(stop)) == free[:first]


def test_bad_special_token_files_fail_in_one_line(tmp_path, corpus_dir, capsys):
    d = gemma_dir(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<end>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: eos_token '<end>' is not a token of tokenizer.json"):
        Tokenizer.load(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.load(d / "tokenizer.json")
    (tmp_path / "copy").mkdir()
    tok.save(tmp_path / "copy" / "tokenizer.json")
    side = json.loads((tmp_path / "copy" / SPECIALS_FILE).read_text())
    (tmp_path / "copy" / SPECIALS_FILE).write_text(json.dumps({**side, "eos_id": 5}))
    with pytest.raises(DataError, match=r"eos_id 5 is '<start_of_turn>' in tokenizer.json, not '<eos>'") as e:
        Tokenizer.load(tmp_path / "copy" / "tokenizer.json")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- import-hf, init_from, plan

def gemma_model_dir(d):
    """A tiny random Gemma 3 checkpoint saved by transformers, with the Gemma-style tokenizer."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).float().eval()
    model.save_pretrained(d)
    gemma_dir(d)
    return model


def test_import_hf_and_init_from_carry_gemma_special_tokens(tmp_path, corpus_dir, data_cache):
    from conftest import tiny_recipe

    from stagewise.config.loader import load_recipe
    from stagewise.interop.hf_io import import_hf
    from stagewise.rundir import load_model
    from stagewise.train.runner import start as train

    gemma_model_dir(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    side = json.loads((tmp_path / "sw" / SPECIALS_FILE).read_text())
    assert (side["eos_token"], side["bos_token"], side["add_bos"], side["stop_ids"]) == ("<eos>", "<bos>", True,
                                                                                        [1, END_OF_TURN])
    _, tok, _ = load_model(tmp_path / "sw", torch.device("cpu"))
    auto, stops = reference(tmp_path / "hf")
    assert tok.encode_prompt(TEXTS[0]) == auto(TEXTS[0])["input_ids"] and set(tok.stop_ids) == stops

    docs = docs_dir(tmp_path / "docs", n=60)
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    cfg = load_recipe(recipe, [f"--init_from={tmp_path / 'sw'}", "--train.steps=2", "--train.batch_size=2",
                               f"--data.sources=[{{kind: text, path: {docs}}}]", "--data.val_fraction=0.2",
                               "--sample.prompts=[]", "--eval.every=0", "--schedule.warmup_steps=0"])
    run = train(cfg, log=lambda m: None)
    dataset = json.loads((run / "run_info.json").read_text())["dataset"]
    ds = open_dataset(dataset)
    assert ds.train.tolist() == reference_stream(tmp_path / "hf", docs, 0.2, "train")
    for where in (run, run / "final"):
        assert json.loads((where / SPECIALS_FILE).read_text())["bos_id"] == 2
        assert load_model(where, torch.device("cpu"))[1].specials == tok.specials


def test_import_hf_refuses_a_tokenizer_config_naming_no_token(tmp_path, capsys):
    gemma_model_dir(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "<start>"}))
    from stagewise.interop.hf_io import import_hf

    with pytest.raises(CheckpointError, match="bos_token '<start>' is not a token"):
        import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "sw").exists()
    shutil.rmtree(tmp_path / "hf")
