"""Import/export of Llama, Mistral, Qwen2, Qwen3 and Gemma 3 checkpoints, against transformers itself.

For each family a tiny random model is built by transformers (config class -> save_pretrained),
imported with `stagewise import-hf`'s code path, and compared on logits (fp32, <= 1e-4, sequences
longer than the sliding window) and 20 greedy tokens; the export is reloaded by transformers'
Auto classes and compared again. Bad inputs fail with one CheckpointError/ConfigError line and
leave nothing behind.
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from stagewise.cli import main  # noqa: E402
from stagewise.data.tokenizer import train_bpe  # noqa: E402
from stagewise.errors import CheckpointError, ConfigError  # noqa: E402
from stagewise.generate import generate  # noqa: E402
from stagewise.interop.hf_io import export_hf, import_hf  # noqa: E402
from stagewise.rundir import load_model  # noqa: E402

V = 320  # model vocabulary; the tokenizer below has at most 300 tokens
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2, eos_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {  # case: (config class, kwargs); GQA with one KV head, head_dim != d/heads, tied and untied
    "llama3-untied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                          rope_parameters=LLAMA3_ROPE)),
    "llama-mqa-hd24-tied": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 5e4})),
    "mistral-window8-mqa": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=8,
                                                  tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm-hd24": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=False)),
    # use_sliding_window with max_window_layers 0: transformers slides on every layer
    "qwen2-window8-every-layer": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                      use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "qwen3-window8-every-layer": ("Qwen3Config", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                      use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "gemma3-local-global": ("Gemma3TextConfig", dict(
        num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
CAUSAL_LM = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
             "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
             "Gemma3TextConfig": "Gemma3ForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, corpus_dir):
    d = tmp_path_factory.mktemp("tok")
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())[:5]]
    train_bpe(texts, 300).save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"}))
    return d


def build_hf(case, out, tokenizer_files, **save_kw):
    cls_name, kw = FAMILIES[case]
    cfg = getattr(transformers, cls_name)(**COMMON, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, CAUSAL_LM[cls_name])(cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1 (Gemma: 0) and biases to 0: randomise to see each mapped
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if "Gemma" in cls_name else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    model.save_pretrained(out, **save_kw)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, out / f.name)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "do_sample": False}))
    return model


def logits_diff(ours, hf, tokens):
    with torch.no_grad():
        return (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()


def hf_greedy(hf, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: token 0 is also HF's pad id here
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", FAMILIES)
def test_import_export_parity(case, tmp_path, tokenizer_files):
    hf = build_hf(case, tmp_path / "hf", tokenizer_files,
                  **({"max_shard_size": "40KB"} if case.startswith("qwen3") else {}))
    if case.startswith("qwen3"):
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # the sharded path is exercised
    import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "sw" / f).is_file(), f
    ours, tok, mcfg = load_model(tmp_path / "sw", torch.device("cpu"))
    assert ours.cfg.tie_embeddings == hf.config.tie_word_embeddings

    tokens = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(0))  # 40 > window 8
    diff = logits_diff(ours, hf, tokens)
    print(f"{case}: import max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    prompt = tokens[0, :12].tolist()
    assert generate(ours, prompt, 20, temperature=0.0) == hf_greedy(hf, prompt, 20)

    shard = {"max_shard_bytes": 30_000} if case.startswith("gemma") else {}
    export_hf(tmp_path / "sw", tmp_path / "back", log=lambda m: None, **shard)
    if shard:
        assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    diff_back = logits_diff(ours, back, tokens)
    print(f"{case}: export max |logit diff| = {diff_back:.2e}")
    assert diff_back <= 1e-4
    # The tokenizer round-trips: transformers reads the export exactly as it read the original.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    orig_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def parse(args):\n    return args"
    assert hf_tok(text)["input_ids"] == orig_tok(text)["input_ids"]
    assert hf_tok.chat_template == orig_tok.chat_template is not None
    assert hf_tok.get_vocab() == tok.backend.get_vocab()


def test_export_of_a_model_trained_from_scratch(tmp_path, tokenizer_files):
    """A stagewise-native model (no HF origin) exports as Llama and loads in transformers."""
    from stagewise.checkpoint import export_config, export_safetensors
    from stagewise.config.schema import ModelConfig
    from stagewise.model import Transformer

    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=64)
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    export_safetensors(model, export_config(cfg), tmp_path / "sw",
                       extra_files={"tokenizer.json": tokenizer_files / "tokenizer.json"})
    assert main(["export-hf", str(tmp_path / "sw"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    assert logits_diff(model, hf, tokens) <= 1e-4
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")


@pytest.fixture()
def llama_dir(tmp_path, tokenizer_files):
    build_hf("llama3-untied", tmp_path / "hf", tokenizer_files)
    return tmp_path / "hf"


def _edit_weights(d, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BAD = {
    "missing tensor": (lambda d: _edit_weights(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")),
                       CheckpointError, r"'model.layers.1.mlp.down_proj.weight' is missing"),
    "unexpected tensor": (lambda d: _edit_weights(d, lambda sd: sd.update(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})), CheckpointError,
        r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'; expected Llama weights"),
    "wrong shape": (lambda d: _edit_weights(d, lambda sd: sd.update(
        {"model.norm.weight": torch.ones(65)})), CheckpointError, r"'model.norm.weight' has shape \[65\]"),
    "wrong dtype": (lambda d: _edit_weights(d, lambda sd: sd.update(
        {"model.norm.weight": torch.ones(64, dtype=torch.int32)})), CheckpointError, "dtype int32"),
    "truncated file": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                       CheckpointError, "truncated or corrupt"),
    "config disagrees": (lambda d: _edit_config(d, intermediate_size=128), CheckpointError,
                         r"config.json implies \[128, 64\]; the config and the weights disagree"),
    "unsupported architecture": (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 ConfigError, r"GPT2LMHeadModel .*not supported; supported: LlamaForCausalLM"),
    "unsupported feature": (lambda d: _edit_config(d, hidden_act="relu"), ConfigError, "hidden_act"),
    "missing shard": (lambda d: (d / "model.safetensors").rename(d / "elsewhere.bin"), CheckpointError,
                      "no model.safetensors"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_cleanly(case, llama_dir, tmp_path, capsys):
    damage, error, message = BAD[case]
    damage(llama_dir)
    with pytest.raises(error, match=message):
        import_hf(llama_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert main(["import-hf", str(llama_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_tokenizer_larger_than_embedding(llama_dir, tmp_path, corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())[:8]]
    train_bpe(texts, 400).save(llama_dir / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer has 400 tokens but the embedding has 320 rows"):
        import_hf(llama_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_of_a_sharded_checkpoint(tmp_path, tokenizer_files):
    build_hf("qwen2-bias-tied", tmp_path / "hf", tokenizer_files, max_shard_size="40KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} cannot be read"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_cli_on_an_imported_model(tmp_path, tokenizer_files, capsys):
    build_hf("gemma3-local-global", tmp_path / "hf", tokenizer_files)
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "sw")]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "sw"), "--prompt", "def ", "--greedy", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_recipe_init_from_an_hf_directory(tmp_path, tokenizer_files, corpus_dir, data_cache):
    """A recipe starts from an HF directory: its architecture, tokenizer and weights are used, the run's
    first loss is the HF model's own loss on that batch, and export-hf of the run keeps the family."""
    from conftest import tiny_recipe

    from stagewise.config.loader import load_recipe
    from stagewise.train.runner import start as train

    hf = build_hf("qwen3-qknorm-hd24", tmp_path / "hf", tokenizer_files)
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    cfg = load_recipe(recipe, [f"--init_from={tmp_path / 'hf'}", "--train.steps=3", "--optim.lr=1e-6",
                               "--schedule.warmup_steps=0", "--sample.prompts=[]"])
    run = train(cfg, log=lambda m: None)
    assert json.loads((run / "model_config.json").read_text())["qk_norm"] is True
    assert (run / "tokenizer.json").read_text() == (tokenizer_files / "tokenizer.json").read_text()
    assert (run / "tokenizer_config.json").is_file() and (run / "hf_config.json").is_file()
    ours, _, _ = load_model(run, torch.device("cpu"))
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(2))
    # 3 steps at lr 1e-6 move no weight by more than ~3e-6: the run started from the HF weights.
    assert logits_diff(ours, hf, tokens) < 1e-2
    export_hf(run, tmp_path / "back", log=lambda m: None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    assert logits_diff(ours, back, tokens) <= 1e-4


def _qwen_config_edit(d, drop=(), **changes):
    cfg = json.loads((d / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_qwen_sliding_window_import_and_export_agree(tmp_path, tokenizer_files):
    """use_sliding_window on every layer imports as a window on every layer (the window really is in
    effect: without it the logits differ) and exports as one that transformers reads back."""
    import dataclasses

    from stagewise.model import Transformer

    hf = build_hf("qwen2-window8-every-layer", tmp_path / "hf", tokenizer_files)
    import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    ours, _, mcfg = load_model(tmp_path / "sw", torch.device("cpu"))
    assert (mcfg.sliding_window, mcfg.global_every) == (8, 0)
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(4))
    assert logits_diff(ours, hf, tokens) <= 1e-4
    full = Transformer(dataclasses.replace(mcfg, sliding_window=None)).eval()
    full.load_state_dict(ours.state_dict())
    assert logits_diff(full, hf, tokens) > 1e-2
    export_hf(tmp_path / "sw", tmp_path / "back", log=lambda m: None)
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert back.use_sliding_window and back.sliding_window == 8 and set(back.layer_types) == {"sliding_attention"}


@pytest.mark.parametrize("case", ["no-use_sliding_window", "max_window_layers-0"])
def test_qwen_hub_style_configs_import_as_transformers_reads_them(case, tmp_path, tokenizer_files):
    """Hub configs written by older transformers have no layer_types: which layers slide follows from
    use_sliding_window (default false) and max_window_layers, as Qwen2Config derives them."""
    build_hf("qwen2-window8-every-layer", tmp_path / "hf", tokenizer_files)
    if case == "no-use_sliding_window":  # a sliding_window value alone does not turn the window on
        _qwen_config_edit(tmp_path / "hf", drop=("layer_types", "use_sliding_window"))
    else:
        _qwen_config_edit(tmp_path / "hf", drop=("layer_types",), max_window_layers=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    ours, _, mcfg = load_model(tmp_path / "sw", torch.device("cpu"))
    assert mcfg.sliding_window == (None if case == "no-use_sliding_window" else 8)
    tokens = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(5))
    assert logits_diff(ours, ref, tokens) <= 1e-4


def test_qwen_sliding_window_on_some_layers_is_refused(tmp_path, tokenizer_files, capsys):
    build_hf("qwen2-window8-every-layer", tmp_path / "hf", tokenizer_files)
    _qwen_config_edit(tmp_path / "hf", drop=("layer_types",), max_window_layers=1)  # layer 0 full, 1-2 sliding
    with pytest.raises(ConfigError, match=r"HF config max_window_layers: Qwen2 import supports a sliding window "
                                          r"on every layer or on none, got 1 \(full attention below layer 1"):
        import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    # Nor a layer_types pattern with global layers between local ones, which a Qwen2 export could not write.
    _qwen_config_edit(tmp_path / "hf", layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with pytest.raises(ConfigError, match=r"HF config layer_types: Qwen2 import supports a sliding window on every "
                                          r"layer or on none, got \['sliding_attention', 'full_attention'"):
        import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "sw").exists()
    # Export refuses what Qwen2 cannot express either: local layers with some global ones between.
    from stagewise.config.schema import ModelConfig
    from stagewise.interop.hf_families import FAMILIES as HF_FAMILIES, to_hf_config

    mixed = ModelConfig(vocab_size=V, d_model=64, n_layers=4, n_heads=4, attention_bias=True, sliding_window=8,
                        global_every=2)
    with pytest.raises(ConfigError, match=r"model.global_every: a Qwen2 export needs 0 \(every layer local\), got 2"):
        to_hf_config(mixed, HF_FAMILIES["qwen2"])


def test_gemma3_config_without_layer_types_follows_sliding_window_pattern():
    """Older Gemma 3 configs give sliding_window_pattern instead of layer_types; the local/global layout
    is the one transformers' Gemma3TextConfig derives from it."""
    from stagewise.interop.hf_families import from_hf_config
    from stagewise.model.llama import is_local_layer

    ref = transformers.Gemma3TextConfig(num_hidden_layers=12, sliding_window=8, sliding_window_pattern=4)
    hf = {k: v for k, v in ref.to_dict().items() if k != "layer_types"}
    hf["sliding_window_pattern"] = 4
    cfg = from_hf_config(hf)
    assert [is_local_layer(cfg, i) for i in range(12)] == [t == "sliding_attention" for t in ref.layer_types]
    assert (cfg.sliding_window, cfg.global_every) == (8, 4)
