"""Whether a checkpoint on disk is the one that was saved, and a full disk said in one line.

Every checkpoint's train_state.json records each of its files' size and sha256 (store.py, after the
tensors are written); a resume takes the newest checkpoint whose files match (store.py
latest_valid_checkpoint) and names every newer one it passes over.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from stagewise.errors import CheckpointError


def file_checksums(path: Path, skip: str) -> dict[str, dict]:
    """name -> {bytes, sha256} of every file directly in `path` but `skip` (the record itself)."""
    out = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file() and entry.name != skip:
            h = hashlib.sha256()
            with open(entry.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[entry.name] = {"bytes": entry.stat().st_size, "sha256": h.hexdigest()}
    return out


def verify_files(path: Path, files: dict | None) -> None:
    """One CheckpointError naming the first of `files` (a record's "files") that is missing, cut short
    or changed since it was saved; None (a checkpoint from before the record) checks nothing."""
    if not isinstance(files, dict):
        return
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the checkpoint is incomplete")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{path}: {name} has {size} bytes, {want.get('bytes')} were saved; the file is "
                                  "truncated or damaged")
    found = file_checksums(path, skip="")
    for name, want in files.items():
        if found[name]["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match the checksum recorded when it was saved; "
                                  "the file is damaged")


def write_or_explain(tmp: Path, write, needed: int, remove: bool) -> None:
    """Run `write` into the temporary checkpoint directory `tmp`; a write that fails on a full disk
    (ENOSPC anywhere in the cause chain, or less free space left than the `needed` bytes: torch's writer
    reports only "file write failed") becomes one line, with `tmp` removed (remove: this process owns
    it) and the previous checkpoints untouched."""
    try:
        write()
    except Exception as e:
        chain, cause = [], e
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        full = any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain)
        try:
            full = full or shutil.disk_usage(tmp.parent).free < needed
        except OSError:
            pass
        if not full:
            raise
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"no space left on {tmp.parent}: the checkpoint needs ~{needed / 2**20:,.0f} MiB; the "
                              "previous checkpoints are intact; free space and resume") from None
