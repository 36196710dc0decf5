"""Adapters on disk: stagewise's own files, and Hugging Face PEFT's format in and out.

stagewise writes next to every adapter run's merged export (RUN_DIR/final, RUN_DIR/stages/<name>):
  adapter.safetensors  the adapter tensors under stagewise names (layers.0.attention.wq.lora_A, lora_B,
                       lora_magnitude, and lora_A0 / lora_B0 of base-moving inits)
  adapter.json         kind, alpha, rslora, dropout, init, rank per layer, base hash and base path

PEFT (`export-peft`, `import-peft`): adapter_config.json + adapter_model.safetensors with keys
base_model.model.<HF module path>.lora_A.weight [r, in], .lora_B.weight [out, r] and, for DoRA,
.lora_magnitude_vector [out]. A base-moving init (PiSSA, OLoRA, LoRA-GA) trained on W - s B0 A0 is
written as the plain LoRA of rank 2r with A' = [A; A0], B' = [B, -B0] (alpha doubled, or times
sqrt(2) with rslora, so the scale is unchanged) that applies to the original W, as peft's
`path_initial_model_for_weight_conversion` does. EVA's per-layer ranks go to rank_pattern.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stagewise.adapters.apply import adapters, hf_module_name, stagewise_module_name
from stagewise.errors import CheckpointError, ConfigError
from stagewise.rundir import check_new_dir

ADAPTER_WEIGHTS, ADAPTER_META = "adapter.safetensors", "adapter.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FORMAT = "stagewise.adapter"
_PREFIX = "base_model.model."


def write_adapter_files(model, out: Path) -> dict[str, Path]:
    """adapter.safetensors + adapter.json of `model`'s adapters into `out`; returns {file name: path}."""
    layers = adapters(model)
    tensors = {}
    for name, layer in layers.items():
        for key, t in layer.state_dict().items():
            if key.startswith("lora_"):
                tensors[f"{name}.{key}"] = t.detach().float().cpu().contiguous()
    first = next(iter(layers.values()))
    record = dict(getattr(model, "adapter_record", {}))
    meta = {"format": ADAPTER_FORMAT, "kind": "dora" if first.dora else "lora", "alpha": first.alpha,
            "rslora": first.rslora, "dropout": getattr(first.dropout, "p", 0.0), "init": record.get("init"),
            "ranks": {n: layer.r for n, layer in layers.items()}, "moved": [n for n, l in layers.items() if l.moves_base],
            "packed": {n: l.packed.kind for n, l in layers.items() if l.packed is not None},
            "base_hash": record.get("base_hash"), "base": record.get("base"), "seed": record.get("seed", 0),
            "quant": record.get("quant"), "n_layers": model.cfg.n_layers}
    out = Path(out)
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": ADAPTER_FORMAT})
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    return {ADAPTER_WEIGHTS: out / ADAPTER_WEIGHTS, ADAPTER_META: out / ADAPTER_META}


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter.json, tensors) of an export directory that holds an adapter."""
    path = Path(path)
    if not (path / ADAPTER_META).is_file():
        raise CheckpointError(f"{path}: holds no adapter ({ADAPTER_META}); expected the final/ or stages/<name>/ "
                              "export of a run with adapter.kind lora or dora")
    meta = json.loads((path / ADAPTER_META).read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path / ADAPTER_META}: not a stagewise adapter record")
    return meta, load_file(path / ADAPTER_WEIGHTS)


# -- PEFT out -----------------------------------------------------------------------------------

def to_peft(meta: dict, tensors: dict[str, torch.Tensor], base_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) of a stagewise adapter."""
    out = {}
    ranks, moved = dict(meta["ranks"]), set(meta["moved"])
    for name, r in meta["ranks"].items():
        hf = _PREFIX + hf_module_name(name)
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        if name in moved:  # the plain LoRA of rank 2r against the original W
            A = torch.cat([A, tensors[f"{name}.lora_A0"]], 0)
            B = torch.cat([B, -tensors[f"{name}.lora_B0"]], 1)
            ranks[name] = 2 * r
        out[f"{hf}.lora_A.weight"] = A.contiguous()
        out[f"{hf}.lora_B.weight"] = B.contiguous()
        if f"{name}.lora_magnitude" in tensors:
            out[f"{hf}.lora_magnitude_vector"] = tensors[f"{name}.lora_magnitude"].contiguous()
    alpha = meta["alpha"]
    if moved:
        alpha = alpha * (2 ** 0.5 if meta["rslora"] else 2)
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    short = sorted({hf_module_name(n).rsplit(".", 1)[-1] for n in ranks})
    # Short names (q_proj, ...) when they select exactly the adapted layers, else every module path.
    kinds = {n.split(".", 2)[2] for n in ranks if n.startswith("layers.")} | ({"output"} & set(ranks))
    exact = {f"layers.{i}.{k}" for i in range(meta["n_layers"]) for k in kinds if k != "output"} | \
        ({"output"} & kinds)
    covers = exact == set(ranks)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": common, "lora_alpha": alpha, "lora_dropout": meta["dropout"], "bias": "none",
        "target_modules": short if covers else sorted(hf_module_name(n) for n in ranks),
        "rank_pattern": {hf_module_name(n): r for n, r in ranks.items() if r != common},
        "alpha_pattern": {}, "use_rslora": meta["rslora"], "use_dora": meta["kind"] == "dora",
        "init_lora_weights": True, "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }
    return config, out


def export_peft(src: Path, out: Path, base_name: str | None = None, log=print) -> Path:
    """Write the PEFT adapter of export directory `src` (a run's final/ or stages/<name>/) to `out`."""
    src, out = Path(src), check_new_dir(out)
    meta, tensors = read_adapter(src)
    config, peft_tensors = to_peft(meta, tensors, base_name or meta.get("base") or "")
    out.mkdir(parents=True)
    save_file(peft_tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    if meta["packed"]:
        log(f"note: the base was stored packed ({', '.join(sorted(set(meta['packed'].values())))}) during training; "
            "this adapter applies to the unpacked base, as peft loads it")
    log(f"exported PEFT adapter ({len(meta['ranks'])} layers, {meta['kind']}, r {config['r']}) to {out}")
    return out


# -- PEFT in ------------------------------------------------------------------------------------

def read_peft(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT LoRA adapter directory, checked for what stagewise can apply."""
    path = Path(path)
    cfg_file = path / PEFT_CONFIG
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: not a PEFT adapter directory (no {PEFT_CONFIG})")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot be read as JSON ({type(e).__name__})") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type {kind!r} is not supported; valid: LORA (with or without use_dora)")
    for key, ok, what in (("bias", lambda v: v in (None, "none"), "none"),
                          ("fan_in_fan_out", lambda v: not v, "false"),
                          ("modules_to_save", lambda v: not v, "null"),
                          ("alpha_pattern", lambda v: not v, "{}")):
        if not ok(config.get(key)):
            raise ConfigError(f"{cfg_file}: {key} {config.get(key)!r} is not supported; valid: {what}")
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{path}: no {PEFT_WEIGHTS} (adapters saved as .bin are pickles, which stagewise never "
                          "loads; re-save with safe_serialization=True)")
    return config, load_file(weights)


def from_peft(config: dict, tensors: dict[str, torch.Tensor], where: str = "PEFT adapter") -> tuple[dict, dict]:
    """A PEFT LoRA adapter as stagewise's (meta, tensors) (see write_adapter_files)."""
    ranks, out = {}, {}
    for key, t in tensors.items():
        body = key.removeprefix(_PREFIX)
        for suffix, ours in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                             (".lora_magnitude_vector", "lora_magnitude")):
            if body.endswith(suffix):
                module = body[: -len(suffix)]
                name = stagewise_module_name(module)
                if name is None:
                    raise ConfigError(f"{where}: adapts {module!r}, which is not a linear layer of a Llama-family "
                                      "model (valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
                                      "lm_head)")
                out[f"{name}.{ours}"] = t.float()
                if ours == "lora_A":
                    ranks[name] = t.shape[0]
                break
        else:
            raise ConfigError(f"{where}: unexpected tensor {key!r}; expected LoRA keys such as "
                              f"{_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight")
    r_cfg = config.get("r", 8)
    alpha = float(config.get("lora_alpha", r_cfg))
    rslora = bool(config.get("use_rslora"))
    # stagewise keeps one alpha; a layer whose rank differs from r keeps peft's scale alpha / r_layer.
    meta = {"format": ADAPTER_FORMAT, "kind": "dora" if config.get("use_dora") else "lora", "alpha": alpha,
            "rslora": rslora, "dropout": float(config.get("lora_dropout") or 0.0), "init": "default",
            "ranks": ranks, "moved": [], "packed": {}, "base_hash": None,
            "base": config.get("base_model_name_or_path")}
    return meta, out


def apply_adapter(model, meta: dict, tensors: dict[str, torch.Tensor], where: str, quant=None) -> None:
    """Attach `meta`'s adapters to `model` (its base weights loaded) and load `tensors` into them,
    every shape checked; quant: (kind, block, double) to pack the base as the run trained it."""
    from stagewise.adapters.apply import attach, settle
    from stagewise.config.schema import AdapterConfig

    cfg = AdapterConfig(kind=meta["kind"], alpha=meta["alpha"], rslora=meta["rslora"])
    if quant is not None:
        cfg.base_quant, cfg.quant_block, cfg.double_quant = quant
    for name in meta["ranks"]:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{where}: adapts {hf_module_name(name)}, which this base model does not have "
                              f"({model.cfg.n_layers} layers); the adapter is for a different base") from None
    attach(model, cfg, meta["ranks"])
    layers = adapters(model)
    for name in meta["moved"]:
        layers[name].declare_moved_base()
    for name, layer in layers.items():
        for key, target in layer.state_dict().items():
            if not key.startswith("lora_"):
                continue
            t = tensors.get(f"{name}.{key}")
            if t is None or t.shape != target.shape:
                got = "missing" if t is None else f"shape {list(t.shape)}"
                raise ConfigError(f"{where}: {hf_module_name(name)} {key} is {got}, the base model needs "
                                  f"{list(target.shape)}; the adapter is for a different base")
            with torch.no_grad():
                target.copy_(t.to(target.dtype))
    settle(model, cfg, None)


def _adapted_base(adapter_dir: Path, base):
    """(model with the PEFT adapter applied, model config, tokenizer dir, HF config) of `base`."""
    from stagewise import rundir
    from stagewise.adapters.apply import state_hash
    from stagewise.model import Transformer

    config, tensors = read_peft(adapter_dir)
    meta, ours = from_peft(config, tensors, str(adapter_dir))
    mcfg, state, files_dir, hf = rundir.load_init_source(base)
    model = Transformer(mcfg)
    rundir.load_weights(model, state, f"base {base}")
    meta.update(base=str(base), base_hash=state_hash(model), n_layers=mcfg.n_layers, seed=0, quant=None)
    apply_adapter(model, meta, ours, str(adapter_dir))
    model.adapter_record = meta
    return model, mcfg, files_dir, hf


def peft_merged(adapter_dir: Path, base):
    """load_init_source's tuple for a PEFT adapter directory: `base`'s weights with the adapter merged."""
    from stagewise.adapters.apply import merged_state_dict

    model, mcfg, files_dir, hf = _adapted_base(adapter_dir, base)
    return mcfg, merged_state_dict(model), files_dir, hf


def import_peft(adapter_dir: Path, base, out: Path, log=print) -> Path:
    """A stagewise model directory at `out`: `base` with the PEFT adapter merged in, plus the adapter."""
    import tempfile

    from stagewise import rundir
    from stagewise.adapters.apply import merged_state_dict
    from stagewise.checkpoint import export_config, export_safetensors

    out = check_new_dir(out)
    model, mcfg, files_dir, hf = _adapted_base(adapter_dir, base)
    meta = model.adapter_record
    with tempfile.TemporaryDirectory() as tmp:
        files = rundir.tokenizer_files(Path(files_dir)) | write_adapter_files(model, Path(tmp))
        export_safetensors(model, export_config(mcfg, hf), out, extra_files=files, state=merged_state_dict(model))
    log(f"imported PEFT adapter {adapter_dir} ({len(meta['ranks'])} layers, {meta['kind']}) onto {base} -> {out}")
    return out
