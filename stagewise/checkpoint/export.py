"""Model weights for other tools: `model.safetensors` + `config.json`, and reading weights back.

`config.json` of a stagewise export is `export_config(model_config)`:
`{"format": "stagewise", "stagewise_model": {...}}`, plus `"hf_config"` for a model imported
from Hugging Face (the config it came from, which `export-hf` writes back).

Tied weights (an embedding shared with the output head) are stored once. The dropped name
is recorded in the safetensors header metadata as `{dropped: kept}`, the convention of
`safetensors.torch.save_model`, so `safetensors.torch.load_model` and `load_model_state`
restore both names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from stagewise.checkpoint._atomic import TMP_PREFIX, fsync_tree, publish_dir, write_text_durable
from stagewise.checkpoint.safe_dcp import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    quiet_single_process,
    read_dcp_metadata,
)
from stagewise.checkpoint.store import DCP_METADATA_FILE, MODEL_PREFIX
from stagewise.config.schema import ModelConfig
from stagewise.errors import CheckpointError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FORMAT = "stagewise"  # config.json's "format" in a stagewise export; an HF config.json has none


def export_config(model_config: ModelConfig, hf_config: dict | None = None) -> dict:
    """The config.json of a stagewise export of a model with this architecture; `hf_config`: the
    Hugging Face config an imported model came from."""
    config = {"format": EXPORT_FORMAT, "stagewise_model": dataclasses.asdict(model_config)}
    if hf_config is not None:
        config["hf_config"] = hf_config
    return config


def _view_key(t: torch.Tensor) -> tuple | None:
    """Identifies a tensor's exact view of its storage (its local shard, for a DTensor)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if local.numel() == 0:  # empty tensors may all report the same data pointer
        return None
    ptr = local.untyped_storage().data_ptr()
    return (ptr, local.storage_offset(), tuple(local.shape), tuple(local.stride()), local.dtype)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: kept} for state-dict entries that are the very same tensor (tied weights).

    Found on the local (possibly sharded) state dict, where tied parameters share storage;
    the gathered full state dict may hold two copies.
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in get_model_state_dict(model).items():
        key = _view_key(t) if isinstance(t, torch.Tensor) else None
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory or are not contiguous; copy those."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if ptr in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[name] = t
    return out


def _check_export_args(out_dir: Path, config_dict: dict, extra_files: dict[str, Path]) -> str:
    for name, src in extra_files.items():
        if not name or Path(name).name != name or name in (WEIGHTS_FILE, CONFIG_FILE):
            raise CheckpointError(
                f"extra file name {name!r} must be a plain file name other than {WEIGHTS_FILE} and {CONFIG_FILE}"
            )
        if not src.is_file():
            raise CheckpointError(f"extra file {name!r}: source {src} does not exist")
    if out_dir.exists():
        is_export = out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / WEIGHTS_FILE).is_file())
        if not is_export:
            raise CheckpointError(
                f"export directory {out_dir} exists and is not a stagewise export; give a new or empty one"
            )
    try:
        return json.dumps(config_dict, indent=2)
    except (TypeError, ValueError) as e:
        hint = "use numbers, strings, lists and dicts"
        raise CheckpointError(f"model config is not JSON-serializable ({e}); {hint}") from None


def export_safetensors(
    model: nn.Module,
    config_dict: dict,
    out_dir: Path,
    extra_files: dict[str, Path] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `out_dir/model.safetensors`, `config.json` and `extra_files` (name -> source), atomically.
    state: the tensors to write instead of the model's own (an adapter model's merged weights; single
    process only).

    An existing export in `out_dir` is replaced; any other non-empty directory is refused.
    Under torch.distributed every rank must call this (the weights are gathered); rank 0 writes.
    """
    out_dir = Path(out_dir)
    extra_files = {k: Path(v) for k, v in (extra_files or {}).items()}
    config_text = _check_export_args(out_dir, config_dict, extra_files)

    dist_on = dist.is_available() and dist.is_initialized()
    aliases = _tied_aliases(model)
    full = state if state is not None else \
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist_on or dist.get_rank() == 0:
        for name, value in full.items():
            if not isinstance(value, torch.Tensor):
                kind = type(value).__name__
                raise CheckpointError(f"model state entry {name!r} is a {kind}; only tensors can be exported")
        tensors = _unshare({k: v.detach().cpu() for k, v in full.items() if k not in aliases})

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", **aliases})
            write_text_durable(tmp / CONFIG_FILE, config_text)
            for name, src in extra_files.items():
                shutil.copyfile(src, tmp / name)
            fsync_tree(tmp)
            publish_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist_on:
        dist.barrier()
    return out_dir


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    try:
        tensors = load_file(file)
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        kind = type(e).__name__
        raise CheckpointError(f"{file} cannot be read as safetensors ({kind}); the file is corrupt") from None
    for alias, kept in metadata.items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    return tensors


def _load_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    md = read_dcp_metadata(path)
    target = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in md.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX)
    }
    if not target:
        raise CheckpointError(f"{path} holds no model tensors (keys starting with {MODEL_PREFIX!r})")
    # Every process reads the whole model for itself: no collective (no_dist=True).
    with quiet_single_process():
        dcp.load(target, storage_reader=SafeFileSystemReader(path), planner=TensorOnlyLoadPlanner(), no_dist=True)
    return {k.removeprefix(MODEL_PREFIX): v for k, v in target.items()}


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Full model tensors (CPU) from an export directory or a training checkpoint directory."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return _load_safetensors(path)
    if (path / DCP_METADATA_FILE).is_file():
        return _load_dcp_model(path)
    raise CheckpointError(
        f"{path} is neither an exported model ({WEIGHTS_FILE}) nor a stagewise checkpoint ({DCP_METADATA_FILE})"
    )
