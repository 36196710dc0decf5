"""Hugging Face Llama <-> stagewise: config.json and state-dict names.

No transformers import: the mapping is plain data, so exporting needs only torch/safetensors;
tests/test_hf_parity.py checks it against transformers' LlamaForCausalLM.

Weights need no reshaping: our RoPE pairs dimension i with i + head_dim/2 (HF's rotate_half),
so q_proj/k_proj rows are in the same order. Other architectures (Mistral, Qwen, Gemma) differ
only by rows of a table like `LLAMA_NAMES` plus their config quirks.
"""

from __future__ import annotations

import re
from dataclasses import replace

from stagewise.config.schema import ModelConfig
from stagewise.errors import CheckpointError, ConfigError
from stagewise.model.llama import resolved_dims

# (stagewise name, HF name); "{i}" is the layer index. q_norm/k_norm are Qwen3's names and are
# only present when model.qk_norm is on (Llama itself has no QK-norm).
LLAMA_NAMES: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attention.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attention.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
# Derived buffers some HF checkpoints carry; they are recomputed from the config.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|model\.rotary_emb\.inv_freq")


def _compile(table, src: int):
    return [(re.compile(re.escape(row[src]).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), row[1 - src])
            for row in table]


def _rename(sd: dict, table, src: int, what: str, family: str = "Llama") -> dict:
    rules = _compile(table, src)
    out = {}
    for name, tensor in sd.items():
        for pattern, target in rules:
            m = pattern.match(name)
            if m:
                out[target.replace("{i}", m.groupdict().get("i") or "")] = tensor
                break
        else:
            if src == 1 and HF_IGNORED.fullmatch(name):
                continue
            raise CheckpointError(f"{what}: unexpected tensor {name!r}; expected {family} weights "
                                  f"such as {table[2][src].replace('{i}', '0')!r}")
    return out


def to_hf_state_dict(sd: dict, tie_embeddings: bool | None = None) -> dict:
    """stagewise names -> HF LlamaForCausalLM names. A tied head is left out (HF re-ties it from
    config.json); tying is detected from shared storage or a missing output.weight unless given."""
    if tie_embeddings is None:
        emb, out = sd["tok_embeddings.weight"], sd.get("output.weight")
        tie_embeddings = out is None or (out.data_ptr() == emb.data_ptr() and out.shape == emb.shape)
    if tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    return _rename(sd, LLAMA_NAMES, 0, "stagewise state dict")


def from_hf_state_dict(sd: dict) -> dict:
    """HF Llama names -> stagewise names. Without lm_head.weight (tied checkpoints), output.weight
    is the embedding tensor itself, so a tied Transformer loads it strictly."""
    out = _rename(sd, LLAMA_NAMES, 1, "Hugging Face state dict")
    if "tok_embeddings.weight" not in out:
        raise CheckpointError("Hugging Face state dict: model.embed_tokens.weight is missing; expected a "
                              "LlamaForCausalLM checkpoint")
    out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def to_hf_llama_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' LlamaForCausalLM describing the same network."""
    if cfg.qk_norm:
        raise ConfigError("model.qk_norm: expected false for a Llama export (Llama has no QK-norm), got true")
    n_kv, hd, ffn = resolved_dims(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters.
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def from_hf_llama_config(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig for a HF Llama config.json dict; features we do not implement are refused."""
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"HF config {key}: expected {ok!r}, got {hf[key]!r}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"HF config rope_scaling: expected none (plain RoPE), got {rope!r}")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    return replace(
        base or ModelConfig(), vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads, ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_base=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        qk_norm=False)
