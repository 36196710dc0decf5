"""`stagewise import-hf` / `export-hf`: Hugging Face model directories <-> stagewise export directories.

An HF directory is config.json + model.safetensors (or shards listed in model.safetensors.index.json)
+ tokenizer.json (+ tokenizer_config.json with its chat template, generation_config.json, ...).
Import reads it with interop/hf_read.py and writes what `stagewise sample/eval` and `init_from` accept:

    OUT/model.safetensors   stagewise tensor names, the source dtype, a tied head stored once
    OUT/config.json         {"format": "stagewise", "stagewise_model": {...}, "hf_config": {...}}
                            (checkpoint/export.py's export_config)
    OUT/tokenizer.json      + the HF tokenizer/generation side files, copied unchanged
    OUT/stagewise_special_tokens.json  the eos/bos/add_bos/stop tokens those files name
                            (stagewise/data/special_tokens.py), used for data, sampling and eval

Export finds the model as `stagewise sample` does (rundir.py) and writes the family's own
config.json and tensor names, sharded above `max_shard_bytes`, so transformers'
AutoModelForCausalLM/AutoTokenizer load it. Everything is checked before anything is written
(names, shapes, dtypes, truncated files, tokenizer size); a failure writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from stagewise.checkpoint._atomic import TMP_PREFIX, fsync_tree, publish_dir
from stagewise.checkpoint.export import export_config
from stagewise.data.special_tokens import SPECIALS_FILE
from stagewise.errors import ConfigError
from stagewise.interop.hf_families import FAMILIES, family_of, infer_family, to_hf_config, to_hf_state_dict
from stagewise.interop.hf_read import INDEX, TOKENIZER, WEIGHTS, load_hf
from stagewise.rundir import load_model, original_hf_config, resolve_model_source
from stagewise.rundir import check_new_dir

# Copied unchanged in both directions: AutoTokenizer and generate() read them.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model",
              "chat_template.jinja", "chat_template.json", "added_tokens.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size


def _fresh_out(out: Path) -> Path:
    out = check_new_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    publish_dir(tmp, out)


def import_hf(src: str | Path, out: str | Path, gguf_file: str | None = None, log=print) -> Path:
    """Convert an HF model (directory, hub id or GGUF file) into a stagewise export directory at `out`."""
    out = check_new_dir(out)
    with tempfile.TemporaryDirectory(prefix="stagewise-gguf-tok-") as tok_tmp:
        mcfg, sd, hf, files_dir, tok = load_hf(src, gguf_file, Path(tok_tmp))
        tmp = _fresh_out(out)
        try:
            meta = {"format": "pt"}
            if mcfg.tie_embeddings:
                meta["output.weight"] = "tok_embeddings.weight"  # the convention load_model_state restores
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp / WEIGHTS, metadata=meta)
            config = export_config(mcfg, hf_config=hf)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in (TOKENIZER, *SIDE_FILES):
                if (files_dir / name).is_file():
                    shutil.copyfile(files_dir / name, tmp / name)
            if tok.specials.origin:
                (tmp / SPECIALS_FILE).write_bytes(tok.specials_json())
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    n = sum(t.numel() for t in sd.values())
    bos = f", every document starts with {tok.backend.id_to_token(tok.bos_id)!r}" if tok.add_bos else ""
    log(f"imported {family_of(hf).architecture} ({n:,} parameters) -> {out}; documents end with "
        f"{tok.eos_token!r}{bos}")
    return out


# ------------------------------------------------------------------------------------------ export

def write_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index.json above the size limit."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
        return [WEIGHTS]
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name in shard})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files + [INDEX]


def _weights_to_write(model, mcfg, weights: Path, merge: bool, dtype, ckpt) -> tuple[dict, str]:
    """(state dict to export, merge report): a model with adapters only with --merge."""
    from stagewise.adapters import adapters, merged_state_dict
    from stagewise.adapters.peft_format import ADAPTER_META
    from stagewise.adapters.rebuild import merge_report, trained_model

    has_adapter = bool(adapters(model)) or (weights / ADAPTER_META).is_file()
    if not has_adapter:
        return model.state_dict(), ""
    if not merge:
        raise ConfigError(f"{ckpt}: the model carries LoRA/DoRA adapters; pass --merge to write them merged into "
                          f"the base, or use export-peft for the adapters alone")
    if adapters(model):
        trained = model
    else:  # an export: model.safetensors is merged already; rebuild the trained model only to report
        import json

        packed = json.loads((weights / ADAPTER_META).read_text()).get("packed")
        if not packed:
            return model.state_dict(), ""
        trained = trained_model(weights, mcfg)
    state = merged_state_dict(trained)
    return state, merge_report(trained, mcfg, state, dtype)


def export_hf(ckpt: str | Path, out: str | Path, family: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "float32", merge: bool = False,
              log=print) -> Path:
    """Write `ckpt` (run, checkpoint or export dir) as an HF directory of `family` at `out`; a model
    with adapters only with merge (the adapters merged into the base)."""
    out = check_new_dir(out)
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"--arch: expected one of {', '.join(FAMILIES)}, got {family!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    _, weights, meta_dir = resolve_model_source(ckpt)
    model, tok, mcfg = load_model(ckpt, torch.device("cpu"))
    state, report = _weights_to_write(model, mcfg, weights, merge, torch_dtype, ckpt)
    original = original_hf_config(meta_dir)
    if family is not None:
        fam = FAMILIES[family]
    elif original is not None and original.get("model_type") in FAMILIES:
        fam = FAMILIES[original["model_type"]]
    else:
        fam = infer_family(mcfg)
    if original is not None and original.get("model_type") != fam.model_type:
        original = None  # another family's fields would only confuse its loader
    hf = to_hf_config(mcfg, fam, original)
    hf["dtype"] = hf["torch_dtype"] = dtype  # transformers >= 5 reads dtype, older versions torch_dtype
    if original is None:
        hf.setdefault("eos_token_id", tok.eos_id)
    sd = to_hf_state_dict(state, fam, mcfg.tie_embeddings)
    tensors = {k: v.detach().to(torch_dtype).contiguous().clone() for k, v in sd.items()}
    tmp = _fresh_out(out)
    try:
        files = write_sharded(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in (TOKENIZER, *SIDE_FILES):
            if (meta_dir / name).is_file():
                shutil.copyfile(meta_dir / name, tmp / name)
        if not (tmp / "tokenizer_config.json").is_file():
            # A tokenizer we trained ourselves: tell AutoTokenizer to wrap tokenizer.json as it is.
            # Its built-in ChatML template is written out, so apply_chat_template works on the export.
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                      "pad_token": tok.eos_token, "model_max_length": mcfg.max_seq_len}
            if tok.chat_template is not None and not (tmp / "chat_template.jinja").is_file():
                config["chat_template"] = tok.chat_template.source
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {fam.architecture} -> {out} ({', '.join(files)})")
    if report:
        log(report)
    return out
