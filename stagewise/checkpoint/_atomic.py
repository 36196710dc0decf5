"""Publishing a directory all at once: write under a temporary name, fsync, rename into place.

A reader sees either the old directory or the complete new one, never a half-written one,
because `rename` within one filesystem is atomic. Temporary names start with `TMP_PREFIX`
so listings skip them and a later save can remove what a killed process left behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (new names, renames). Best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every regular file directly in `path`, then `path` itself."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def write_text_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` to `target`, replacing an existing `target`.

    A directory cannot be renamed over a non-empty one, so an existing target is first
    renamed aside (to a temporary name that the next cleanup removes) and deleted after the
    new one is in place. A crash between the two renames loses only that one directory.
    """
    parent = target.parent
    if target.exists():
        aside = parent / f"{TMP_PREFIX}replaced-{target.name}-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(target, aside)
        os.rename(tmp, target)
        fsync_dir(parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, target)
        fsync_dir(parent)


def remove_stale_tmp(parent: Path) -> None:
    """Delete what interrupted writes left in `parent`: every `TMP_PREFIX` entry."""
    for entry in os.scandir(parent):
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
