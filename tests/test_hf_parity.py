"""Reference test: our Llama against transformers' LlamaForCausalLM, weights mapped both ways with
the mapping import-hf/export-hf use (interop/hf_families.py, family "llama")."""

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from stagewise.config.schema import ModelConfig  # noqa: E402
from stagewise.errors import CheckpointError, ConfigError  # noqa: E402
from stagewise.interop.hf_families import (FAMILIES, from_hf_config, from_hf_state_dict, to_hf_config,  # noqa: E402
                                           to_hf_state_dict)
from stagewise.model.llama import Transformer, resolved_dims  # noqa: E402

CASES = {  # name: (n_kv_heads, head_dim, tied)
    "mha-untied": (4, None, False),
    "gqa2-tied": (2, None, True),
    "mqa-untied": (1, None, False),
    "gqa2-headdim24-tied": (2, 24, True),
    "mqa-headdim24-untied": (1, 24, False),
}
LLAMA = FAMILIES["llama"]
BASE = ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=4, ffn_dim=160, max_seq_len=64,
                   rope_base=50000.0, norm_eps=1e-6, init_std=0.1)


def our_config(n_kv_heads, head_dim, tied):
    return replace(BASE, n_kv_heads=n_kv_heads, head_dim=head_dim, tie_embeddings=tied)


def explicit(cfg: ModelConfig) -> ModelConfig:
    n_kv, hd, ffn = resolved_dims(cfg)
    return replace(cfg, n_kv_heads=n_kv, head_dim=hd, ffn_dim=ffn)


def hf_model(cfg: ModelConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms make the mapping of each one visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def max_logit_diff(ours, hf, tokens):
    with torch.no_grad():
        return (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_hf_weights_into_our_model(case):
    cfg = our_config(*CASES[case])
    hf = hf_model(cfg)
    # The config mapping is under test too: rebuild ours from HF's own config.json dict.
    ours = Transformer(from_hf_config(hf.config.to_dict(), base=BASE))
    assert explicit(ours.cfg) == explicit(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), LLAMA), strict=True)
    if cfg.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(ours, hf, tokens) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_weights_into_hf_via_config_json_and_safetensors(case, tmp_path):
    cfg = our_config(*CASES[case])
    torch.manual_seed(2)
    ours = Transformer(cfg)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    sd = to_hf_state_dict(ours.state_dict(), LLAMA, cfg.tie_embeddings)
    assert ("lm_head.weight" in sd) == (not cfg.tie_embeddings)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg, LLAMA)))
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_base
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    for name, tensor in sd.items():  # every tensor landed, none left at HF's random init
        assert torch.equal(hf.get_parameter(name), tensor), name
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(ours, hf, tokens) <= 1e-4


def test_tensor_names_and_refusals():
    cfg = our_config(2, None, False)
    sd = Transformer(cfg).state_dict()
    hf = to_hf_state_dict(sd, LLAMA, tie_embeddings=False)
    per_layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(hf) == sorted(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
                                + [f"model.layers.{i}.{n}.weight" for i in range(2) for n in per_layer])
    assert hf["model.layers.1.mlp.down_proj.weight"] is sd["layers.1.feed_forward.w2.weight"]
    assert hf["model.layers.0.post_attention_layernorm.weight"] is sd["layers.0.ffn_norm.weight"]
    assert "lm_head.weight" not in to_hf_state_dict(sd, LLAMA, tie_embeddings=True)
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        from_hf_state_dict({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}, LLAMA)
    with pytest.raises(ConfigError, match="model.qk_norm"):
        to_hf_config(replace(cfg, qk_norm=True), LLAMA)
    with pytest.raises(ConfigError, match="rope_scaling"):
        from_hf_config({**to_hf_config(cfg, LLAMA), "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
