"""Reading torch.distributed.checkpoint (DCP) directories without unpickling arbitrary objects.

DCP's `FileSystemReader.read_metadata` calls plain `pickle.load` on `.metadata`, and its
`DefaultLoadPlanner.load_bytes` calls `torch.load(weights_only=False)` on every non-tensor
entry. Either runs code chosen by whoever wrote the checkpoint. Here:

- `.metadata` is unpickled by `_MetadataUnpickler`, which resolves only the classes DCP's
  metadata is built from (`METADATA_ALLOWLIST`, found by saving real checkpoints) and
  refuses everything else before it is called;
- the decoded metadata is checked for shape (every entry a tensor record, every
  storage file a plain name inside the checkpoint directory, no stream transforms);
- `TensorOnlyLoadPlanner` refuses to load non-tensor entries at all. Stagewise never writes
  any: everything that is not a tensor goes to `train_state.json`.

Tensor payloads are read by DCP itself with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from stagewise.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"

# (module, name) pairs that may appear in a DCP `.metadata` pickle, found by recording
# `find_class` while loading checkpoints saved by torch 2.13 single-process and by 2-rank
# gloo runs (replicated and FSDP2): dataclasses from `metadata`, the filesystem
# `_StorageInfo`, torch.Size, a layout (pickled as `torch.serialization._get_layout(
# "torch.strided")`) and the checkpoint path. dtypes (("torch", "float32"), ...) are
# accepted separately. BytesStorageMetadata is deliberately absent: stagewise writes no
# pickled objects, so a checkpoint holding one is refused at the metadata.
METADATA_ALLOWLIST: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        # StorageMeta.checkpoint_id; Python 3.13 moved the classes to pathlib._local.
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # dtypes pickle as ("torch", "float32") etc.; accept exactly the attributes that are dtypes.
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in METADATA_ALLOWLIST:
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self._source} references {module + '.' + name!r}, which is not allowed in checkpoint metadata "
            "(only torch.distributed.checkpoint metadata classes, torch.Size, dtypes and layouts are)"
        )


def _validate(md: Any, source: Path) -> Metadata:
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{source} is not torch.distributed.checkpoint metadata (found {type(md).__name__})")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{source} has a non-tensor entry {key!r}; stagewise checkpoints hold tensors only")
    storage_meta = getattr(md, "storage_meta", None)
    if not isinstance(md.storage_data, dict) or not isinstance(storage_meta, (StorageMeta, type(None))):
        raise CheckpointError(f"{source} has a malformed storage index; the checkpoint is corrupt")
    for info in md.storage_data.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointError(f"{source} has a malformed storage record; the checkpoint is corrupt")
        rel = info.relative_path
        # Data files must live in the checkpoint directory itself.
        if rel in ("", ".", "..") or "/" in rel or "\\" in rel:
            raise CheckpointError(
                f"{source} points at data file {rel!r}; only plain file names inside the checkpoint are valid"
            )
        if info.transform_descriptors:
            transforms = info.transform_descriptors
            raise CheckpointError(f"{source} uses stream transforms {transforms!r}; stagewise checkpoints use none")
    return md


def read_dcp_metadata(path: Path, rank: int | None = None) -> Metadata:
    """Decode `path/.metadata` (or `__{rank}.metadata`) with the restricted unpickler."""
    fname = ".metadata" if rank is None else f"__{rank}.metadata"
    meta_path = Path(path) / fname
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f, meta_path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete stagewise checkpoint (no {fname})") from None
    except Exception as e:  # any decoding failure means a damaged file, never a reason to go on
        kind = type(e).__name__
        raise CheckpointError(f"{meta_path} cannot be decoded ({kind}); the checkpoint is corrupt") from None
    return _validate(md, meta_path)


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load, even when asked for one (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class SafeFileSystemReader(FileSystemReader):
    """A `FileSystemReader` whose `read_metadata` never unpickles arbitrary objects."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_dcp_metadata(Path(self.path), kwargs.get("rank"))
        # Mirrors FileSystemReader.read_metadata: DCP uses load_id to tell loads apart.
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Loads tensors only; a non-tensor entry would be `torch.load(weights_only=False)`-ed."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; stagewise loads tensors only"
        )
