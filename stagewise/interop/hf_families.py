"""Hugging Face architectures <-> stagewise: config.json mapping and tensor-name tables per family.

One stagewise Transformer covers every family here; a family is a table of tensor names plus the
config options it sets (see ModelConfig). Plain data, no transformers import: import and export
need only torch/safetensors. tests/test_hf_families.py checks every family against transformers
(tests/test_hf_parity.py the Llama mapping in memory, over GQA/MQA, head_dim and tying variants).
Weights need no reshaping: our RoPE pairs dimension i with i + head_dim/2 (HF's rotate_half), so
q_proj/k_proj rows are in the same order.

  llama        LlamaForCausalLM     (Llama 2/3/3.x, rope scaling none/linear/llama3)
  mistral      MistralForCausalLM   (optional sliding window on every layer)
  qwen2        Qwen2ForCausalLM     (q/k/v biases; optional sliding window on every layer)
  qwen3        Qwen3ForCausalLM     (QK-norm; optional sliding window on every layer)
  gemma3_text  Gemma3ForCausalLM    (GeGLU, (1+w) RMSNorm, sandwich norms, QK-norm, sqrt(d) embedding
                                     scale, query_pre_attn_scalar, local/global layers, two RoPE bases)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from stagewise.config.schema import ModelConfig, RopeScalingConfig
from stagewise.errors import CheckpointError, ConfigError
from stagewise.model.llama import is_local_layer, resolved_dims

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


def _rename(sd: dict, table, src: int, what: str, family: str) -> dict:
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


QWEN2_NAMES = LLAMA_NAMES + tuple(
    (f"layers.{{i}}.attention.{ours}.bias", f"model.layers.{{i}}.self_attn.{hf}.bias")
    for ours, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")))

# Gemma 3 has four norms per block: HF's post_attention_layernorm is the *sandwich* norm after
# attention, not (as in Llama) the norm before the MLP, which it calls pre_feedforward_layernorm.
GEMMA3_NAMES = tuple(row for row in LLAMA_NAMES if row[0] != "layers.{i}.ffn_norm.weight") + (
    ("layers.{i}.post_attention_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.post_ffn_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
)


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    label: str
    names: tuple


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "Llama", LLAMA_NAMES),
    Family("mistral", "MistralForCausalLM", "Mistral", LLAMA_NAMES),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2", QWEN2_NAMES),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3", LLAMA_NAMES),
    Family("gemma3_text", "Gemma3ForCausalLM", "Gemma 3 text", GEMMA3_NAMES),
)}
SUPPORTED = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values())


def family_of(hf: dict) -> Family:
    """The family of a HF config.json dict; one line naming the architecture if unsupported."""
    mt = hf.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    arch = ", ".join(hf.get("architectures") or []) or "?"
    raise ConfigError(f"Hugging Face architecture {arch} (model_type {mt!r}) is not supported; "
                      f"supported: {SUPPORTED}")


def infer_family(cfg: ModelConfig) -> Family:
    """The HF family that can express `cfg` (for exporting a model trained from scratch)."""
    if cfg.post_norms or cfg.norm_unit_offset or cfg.scale_embeddings:
        return FAMILIES["gemma3_text"]
    if cfg.qk_norm:
        return FAMILIES["qwen3"]
    if cfg.attention_bias:
        return FAMILIES["qwen2"]
    if cfg.sliding_window is not None:
        return FAMILIES["mistral"]
    return FAMILIES["llama"]


# ---------------------------------------------------------------------------------------- state dicts

def from_hf_state_dict(sd: dict, family: Family) -> dict:
    """HF names -> stagewise names; a missing lm_head (tied) becomes the embedding tensor itself."""
    out = _rename(sd, family.names, 1, "Hugging Face checkpoint", family.label)
    if "tok_embeddings.weight" not in out:
        raise CheckpointError(f"Hugging Face checkpoint: model.embed_tokens.weight is missing; expected a "
                              f"{family.architecture} checkpoint")
    out.setdefault("output.weight", out["tok_embeddings.weight"])
    return out


def to_hf_state_dict(sd: dict, family: Family, tie_embeddings: bool) -> dict:
    if tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    return _rename(sd, family.names, 0, "stagewise model", family.label)


# ---------------------------------------------------------------------------------------- configs

def _refuse(hf: dict, key: str, ok, label: str) -> None:
    if hf.get(key, ok) != ok and not (ok is None and hf.get(key) is None):
        raise ConfigError(f"HF config {key}: {label} import supports {ok!r}, got {hf[key]!r}")


def _rope(params: dict | None, label: str) -> tuple[float | None, RopeScalingConfig]:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "linear":
        return theta, RopeScalingConfig(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScalingConfig(
            kind="llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_seq_len=int(params["original_max_position_embeddings"]))
    raise ConfigError(f"HF config rope_scaling: {label} import supports rope_type default, linear or llama3, "
                      f"got {kind!r}")


def _hf_rope(cfg_theta: float, rs: RopeScalingConfig) -> dict:
    out = {"rope_type": "default" if rs.kind == "none" else rs.kind, "rope_theta": cfg_theta}
    if rs.kind in ("linear", "llama3"):
        out["factor"] = rs.factor
    if rs.kind == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                   original_max_position_embeddings=rs.original_max_seq_len)
    return out


def _layer_types(hf: dict, model_type: str) -> tuple[list[str], str]:
    """(HF's per-layer attention kinds, the config field they come from), as transformers derives them."""
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        return list(hf["layer_types"]), "layer_types"
    if model_type in ("qwen2", "qwen3"):  # Qwen2Config: the layers from max_window_layers on slide
        first = hf.get("max_window_layers", 28)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)], "max_window_layers"
    if model_type == "gemma3_text":  # Gemma3TextConfig: every sliding_window_pattern-th layer is global
        every = hf.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)], \
            "sliding_window_pattern"
    return ["sliding_attention"] * n, "sliding_window"


def _window(hf: dict, family: Family) -> tuple[int | None, int]:
    """(sliding_window, global_every) from HF's sliding_window, use_sliding_window and layer kinds."""
    window = hf.get("sliding_window")
    # Qwen's configs carry a sliding_window that is only used when use_sliding_window is true.
    use = hf.get("use_sliding_window", family.model_type not in ("qwen2", "qwen3"))
    if window is None or use is False:
        return None, 0
    n = hf["num_hidden_layers"]
    types, source = _layer_types(hf, family.model_type)
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return None, 0
    if all(local):
        return int(window), 0
    qwen = family.model_type in ("qwen2", "qwen3")
    for every in range(2, n + 1):  # Gemma's local/global pattern; a Qwen export could not write it back
        if not qwen and local == [(i + 1) % every != 0 for i in range(n)]:
            return int(window), every
    got = f"{hf['max_window_layers']} (full attention below layer {hf['max_window_layers']}, sliding above)" \
        if source == "max_window_layers" else str(types)
    valid = "on every layer or on none" if qwen else "on every layer, on none, or every N-th layer global"
    raise ConfigError(f"HF config {source}: {family.label} import supports a sliding window {valid}, got {got}")


def from_hf_config(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig describing the HF config.json dict `hf`; unsupported features are refused."""
    if not isinstance(hf, dict):
        raise ConfigError(f"HF config.json: expected a JSON object, got a {type(hf).__name__}")
    fam = family_of(hf)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        value = hf.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"HF config {key}: expected a positive integer, got {value!r}"
                              + (" (missing)" if key not in hf else ""))
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"HF config {key}: expected a positive integer or null, got {value!r}")
    label = fam.label
    gemma = fam.model_type == "gemma3_text"
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    want_act = "gelu_pytorch_tanh" if gemma else "silu"
    if act not in (want_act, None) and not (gemma and act == "gelu_tanh"):
        raise ConfigError(f"HF config hidden_act: {label} import supports {want_act!r}, got {act!r}")
    for key in ("mlp_bias", "attention_bias") if fam.model_type != "qwen2" else ("mlp_bias",):
        _refuse(hf, key, False, label)
    if gemma:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            _refuse(hf, key, None, label)
        _refuse(hf, "use_bidirectional_attention", False, label)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"HF config partial_rotary_factor: {label} import supports 1.0, "
                          f"got {hf['partial_rotary_factor']}")

    params = hf.get("rope_parameters")
    if gemma:
        params = params or {}
        full = params.get("full_attention") or hf.get("rope_scaling") or {}
        theta, scaling = _rope(full, label)
        theta = theta or hf.get("rope_theta", 1_000_000.0)
        local_theta, local_scaling = _rope(params.get("sliding_attention"), label)
        if local_scaling.kind != "none":
            raise ConfigError(f"HF config rope_parameters.sliding_attention: {label} import supports the "
                              f"default RoPE on local layers, got {local_scaling.kind!r}")
        local_theta = local_theta or hf.get("rope_local_base_freq", 10_000.0)
    else:
        theta, scaling = _rope(params if params else hf.get("rope_scaling"), label)
        theta = theta or hf.get("rope_theta", 10_000.0)
        local_theta = None
    window, every = _window(hf, fam)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    return replace(
        base or ModelConfig(), vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads, ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_base=float(theta), rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),  # Gemma ties by default, the others do not
        qk_norm=fam.model_type in ("qwen3", "gemma3_text"), attention_bias=fam.model_type == "qwen2",
        mlp_activation="gelu_tanh" if gemma else "silu", norm_unit_offset=gemma, post_norms=gemma,
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        sliding_window=window, global_every=every,
        rope_local_base=float(local_theta) if gemma and window is not None else None,
        init_std=hf.get("initializer_range", 0.02))


def to_hf_config(cfg: ModelConfig, family: Family, original: dict | None = None) -> dict:
    """config.json for `family` describing `cfg`; `original` (the imported HF config) keeps the
    fields stagewise does not model (token ids, ...). Refuses configs the family cannot express."""
    n_kv, hd, ffn = resolved_dims(cfg)
    mt, label = family.model_type, family.label
    gemma = mt == "gemma3_text"
    expected = {  # option -> the value this family has
        "qk_norm": mt in ("qwen3", "gemma3_text"), "attention_bias": mt == "qwen2",
        "mlp_activation": "gelu_tanh" if gemma else "silu", "norm_unit_offset": gemma, "post_norms": gemma,
        "scale_embeddings": gemma}
    for key, want in expected.items():
        if getattr(cfg, key) != want:
            raise ConfigError(f"model.{key}: a {label} export needs {want!r}, got {getattr(cfg, key)!r}")
    if not gemma and cfg.query_pre_attn_scalar not in (None, float(hd)):
        raise ConfigError(f"model.query_pre_attn_scalar: a {label} export needs null, got {cfg.query_pre_attn_scalar}")
    if mt == "qwen2" and hd * cfg.n_heads != cfg.d_model:
        raise ConfigError(f"model.head_dim: a Qwen2 export needs d_model / n_heads = {cfg.d_model // cfg.n_heads}, "
                          f"got {hd}")
    local = [is_local_layer(cfg, i) for i in range(cfg.n_layers)]
    if any(local) and mt == "llama":
        raise ConfigError(f"model.sliding_window: a {label} export needs null, got {cfg.sliding_window}")
    if mt in ("mistral", "qwen2", "qwen3") and any(local) and not all(local):
        raise ConfigError(f"model.global_every: a {label} export needs 0 (every layer local), got {cfg.global_every}")
    if gemma and cfg.rope_scaling.kind == "llama3":
        raise ConfigError("model.rope_scaling.kind: a Gemma 3 export supports none or linear, got 'llama3'")

    hf = {k: v for k, v in (original or {}).items() if k not in ("quantization_config", "rope_scaling")}
    hf.update({
        "architectures": [family.architecture], "model_type": mt, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": ffn, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": n_kv, "head_dim": hd,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "torch_dtype": "float32",
    })
    hf.pop("dtype", None)
    if mt == "qwen2":
        hf.pop("head_dim")
    global_rope = _hf_rope(cfg.rope_base, cfg.rope_scaling)
    if gemma:
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf.pop("hidden_act", None)
        scalar = cfg.query_pre_attn_scalar or hd
        hf["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar  # HF wants an int
        local_base = cfg.rope_local_base or cfg.rope_base
        hf["rope_parameters"] = {"full_attention": global_rope,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}
        # transformers < 5 reads these two instead of rope_parameters.
        hf["rope_theta"], hf["rope_local_base_freq"] = cfg.rope_base, local_base
        # Gemma always has a window; with none, every layer is global and the window is never used.
        hf["sliding_window"] = cfg.sliding_window or cfg.max_seq_len
        hf["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
        hf.pop("sliding_window_pattern", None)
        hf.update(final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False)
    else:
        hf["hidden_act"] = "silu"
        hf["rope_parameters"] = global_rope
        hf["rope_theta"] = cfg.rope_base
        if cfg.rope_scaling.kind != "none":
            hf["rope_scaling"] = global_rope
        if mt in ("llama", "qwen3"):
            hf["attention_bias"] = False
        if mt == "llama":
            hf["mlp_bias"] = False
        if mt == "mistral":
            hf["sliding_window"] = cfg.sliding_window if any(local) else None
        if mt in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=any(local), sliding_window=cfg.sliding_window if any(local) else None,
                      layer_types=["sliding_attention" if x else "full_attention" for x in local])
            if any(local):  # transformers slides from layer max_window_layers on: every layer, as we do
                hf["max_window_layers"] = 0
    return hf

