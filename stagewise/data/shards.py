"""Prepared datasets: documents -> train/val token files on disk, verified on open.

A prepared dataset is a directory:
  train.bin, val.bin  flat token ids (uint16 when the vocab fits, else uint32), each
                      document followed by EOS (and preceded by BOS when the tokenizer's
                      model was trained that way, e.g. Gemma); memory-mapped at training time
  tokenizer.json      the tokenizer that produced them (+ its special-token choice, for an
                      imported tokenizer: data/special_tokens.py)
  manifest.json       counts and sha256 of everything above, so a truncated or swapped
                      file is caught on open rather than silently trained on

Preparation reads the sources twice (scan, then tokenize) so memory stays bounded by
the tokenizer's training sample, not the corpus. Everything is written into a temporary
sibling directory and renamed into place at the end: a crash never leaves a
half-written dataset where a finished one is expected.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stagewise.config.schema import DataConfig
from stagewise.data.sources import describe, fingerprint, iter_documents
from stagewise.data.special_tokens import SPECIALS_FILE
from stagewise.data.tokenizer import TRAINED_SPECIALS, Tokenizer, train_bpe
from stagewise.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
REPREPARE = "re-run stagewise data prepare"
_CHUNK_BYTES = 8 << 20  # text per encode_batch call: big enough to keep every core busy

Log = Callable[[str], None]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def split_value(source_index: int, doc_id: str) -> float:
    """A document's position in [0, 1), from its identity alone: adding or editing other
    documents never moves it between train and val."""
    digest = hashlib.sha256(f"{source_index}/{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ----------------------------------------------------------------------------- prepare

def prepare_dataset(cfg: DataConfig, out_dir: Path, log: Log = print) -> Path:
    """Read cfg.sources, split by document, train or load the tokenizer, write a dataset to out_dir."""
    return _prepare(cfg, Path(out_dir), log, overwrite=True)


def _prepare(cfg: DataConfig, out_dir: Path, log: Log, overwrite: bool) -> Path:
    if not cfg.sources:
        raise DataError("data.sources: empty; add at least one source, or set data.prepared")
    if out_dir.exists() and not _is_dataset_or_empty(out_dir):
        raise DataError(f"{out_dir} exists and is not a stagewise dataset; refusing to overwrite it")
    t0 = time.perf_counter()
    scan = _scan(cfg)
    n_docs, n_bytes = sum(s["documents"] for s in scan.sources), sum(s["bytes"] for s in scan.sources)
    log(f"data: {n_docs} documents, {n_bytes / 1e6:.1f} MB from {len(cfg.sources)} source(s) "
        f"[{time.perf_counter() - t0:.1f}s]")

    if cfg.tokenizer.path:
        tokenizer = Tokenizer.load(cfg.tokenizer.path)
        log(f"data: loaded tokenizer {cfg.tokenizer.path} (vocab {tokenizer.vocab_size})")
    else:
        sample = scan.training_sample(cfg.tokenizer.train_bytes)
        t = time.perf_counter()
        tokenizer = train_bpe(sample, cfg.tokenizer.vocab_size, split_digits=cfg.tokenizer.split_digits)
        log(f"data: trained byte-level BPE, vocab {tokenizer.vocab_size}, on "
            f"{sum(len(s.encode('utf-8')) for s in sample) / 1e6:.1f} MB [{time.perf_counter() - t:.1f}s]")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        t = time.perf_counter()
        splits = _write_tokens(cfg, scan, tokenizer, tmp)
        log(f"data: tokenized train {splits['train']['tokens']:,} tokens ({splits['train']['documents']} docs), "
            f"val {splits['val']['tokens']:,} tokens ({splits['val']['documents']} docs) "
            f"[{time.perf_counter() - t:.1f}s]")
        _write_synced(tmp / TOKENIZER_FILE, tokenizer.backend.to_str(pretty=True).encode("utf-8"))
        if tokenizer.specials.origin:
            _write_synced(tmp / SPECIALS_FILE, tokenizer.specials_json())
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_file": TOKENIZER_FILE,
            "tokenizer_sha256": tokenizer.sha256,
            "splits": splits,
            "sources": scan.sources,
            "val_fraction": cfg.val_fraction,
        }
        if tokenizer.specials.origin:  # absent for stagewise's own tokenizers: their manifests stay as they were
            manifest["special_tokens"] = tokenizer.specials.to_json(tokenizer.backend)
        _write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        published = _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if published:
        log(f"data: wrote {out_dir} ({manifest['dtype']}) in {time.perf_counter() - t0:.1f}s")
    else:
        log(f"data: another process prepared {out_dir} first; using it")
    return out_dir


@dataclass
class _Scan:
    sources: list[dict]            # manifest entries: kind, path, documents, bytes, sha256
    forced_val: Optional[tuple]    # (source index, doc id) moved to val when hashing put none there
    forced_train: Optional[tuple]  # ... moved to train when hashing put every document in val
    sample: list[tuple]            # tokenizer training candidates: (-u, order, nbytes, text), a max-heap on u

    def split_of(self, key: tuple, u: float, val_fraction: float) -> str:
        if key == self.forced_val:
            return "val"
        if key == self.forced_train:
            return "train"
        return "val" if u < val_fraction else "train"

    def training_sample(self, budget: int) -> list[str]:
        """Train documents in order of their split hash (a size-proportional random mix of
        all sources), cut at `budget` bytes."""
        texts, left = [], budget
        for _, _, nbytes, text in sorted(self.sample, reverse=True):
            if nbytes > left:
                text = text.encode("utf-8")[:left].decode("utf-8", "ignore")
            texts.append(text)
            left -= nbytes
            if left <= 0:
                break
        return texts


def _scan(cfg: DataConfig) -> _Scan:
    budget = 0 if cfg.tokenizer.path else cfg.tokenizer.train_bytes
    sources, heap, sample_bytes, order = [], [], 0, 0
    n_val = n_docs = 0
    lowest = highest = None  # (u, key, text): the documents to move if a split comes out empty
    for i, src in enumerate(cfg.sources):
        h, docs, nbytes = hashlib.sha256(), 0, 0
        for doc in iter_documents(src, f"data.sources[{i}]"):
            data = _hash_doc(h, doc.doc_id, doc.text)
            docs, nbytes = docs + 1, nbytes + len(data)
            u, key = split_value(i, doc.doc_id), (i, doc.doc_id)
            if lowest is None or u < lowest[0]:
                lowest = (u, key, doc.text)
            if highest is None or u > highest[0]:
                highest = (u, key, doc.text)
            if u < cfg.val_fraction:
                n_val += 1
            elif budget:
                # Keep the fewest lowest-u train documents that still fill the budget.
                heapq.heappush(heap, (-u, order, len(data), doc.text))
                order, sample_bytes = order + 1, sample_bytes + len(data)
                while sample_bytes - heap[0][2] >= budget:
                    sample_bytes -= heapq.heappop(heap)[2]
        n_docs += docs
        sources.append({"kind": src.kind, "path": src.path, "documents": docs, "bytes": nbytes,
                        "sha256": h.hexdigest()})
    if n_docs < 2:
        raise DataError(f"data.sources: {n_docs} document in all sources; need at least 2 to split into "
                        "train and val (add documents, or split the file into several)")
    scan = _Scan(sources, None, None, heap)
    if n_val == 0:  # too few documents for the hash to pick any: validate on the lowest-u one
        scan.forced_val = lowest[1]
        scan.sample = [e for e in heap if -e[0] != lowest[0]]
    elif n_val == n_docs:
        scan.forced_train = highest[1]
        scan.sample = [(-highest[0], 0, len(highest[2].encode("utf-8")), highest[2])] if budget else []
    return scan


def _hash_doc(h, doc_id: str, text: str) -> bytes:
    data = text.encode("utf-8")
    h.update(f"{doc_id}\0{len(data)}\0".encode("utf-8"))  # length-prefixed: no two corpora collide
    h.update(data)
    return data


def _write_tokens(cfg: DataConfig, scan: _Scan, tokenizer: Tokenizer, tmp: Path) -> dict:
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eos, prefix = tokenizer.eos_id, tokenizer.doc_prefix
    out = {s: {"file": f"{s}.bin", "tokens": 0, "documents": 0, "sha256": hashlib.sha256()} for s in SPLITS}
    files = {s: open(tmp / out[s]["file"], "wb") for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_bytes = {s: 0 for s in SPLITS}

    def flush(split: str) -> None:
        flat: list[int] = []
        for ids in tokenizer.encode_batch(pending[split]):
            flat.extend(prefix)  # a window that starts at a document starts as in the model's pre-training
            flat.extend(ids)
            flat.append(eos)  # the separator: the model learns where documents end
        arr = np.asarray(flat, dtype=dtype).tobytes()
        files[split].write(arr)
        out[split]["sha256"].update(arr)
        out[split]["tokens"] += len(flat)
        out[split]["documents"] += len(pending[split])
        pending[split], pending_bytes[split] = [], 0

    try:
        for i, src in enumerate(cfg.sources):
            h = hashlib.sha256()
            for doc in iter_documents(src, f"data.sources[{i}]"):
                nbytes = len(_hash_doc(h, doc.doc_id, doc.text))
                split = scan.split_of((i, doc.doc_id), split_value(i, doc.doc_id), cfg.val_fraction)
                pending[split].append(doc.text)
                pending_bytes[split] += nbytes
                if pending_bytes[split] >= _CHUNK_BYTES:
                    flush(split)
            if h.hexdigest() != scan.sources[i]["sha256"]:
                raise DataError(f"data.sources[{i}]: {describe(src)} changed while being prepared; run it again")
        for split in SPLITS:
            if pending[split]:
                flush(split)
            files[split].flush()
            os.fsync(files[split].fileno())
    finally:
        for f in files.values():
            f.close()
    for split in SPLITS:
        out[split]["sha256"] = out[split]["sha256"].hexdigest()
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _is_dataset_or_empty(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or not any(path.iterdir()))


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> bool:
    """Rename tmp to out_dir. Returns False when another process published first and
    overwrite is off (the cache case: both copies are the same dataset, keep theirs)."""
    if out_dir.exists():
        if not overwrite and (out_dir / MANIFEST).is_file():
            return False
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, out_dir)
        except OSError:  # lost a race to another process preparing the same cache entry
            if overwrite or not (out_dir / MANIFEST).is_file():
                raise
            return False
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
    return True


# ----------------------------------------------------------------------------- cache

def dataset_key(cfg: DataConfig) -> str:
    """Name of the cache entry for cfg: everything that defines the dataset (not seq_len),
    plus a cheap fingerprint of the input files so edited data is re-prepared."""
    if not cfg.sources:
        raise DataError("data.sources: empty; add at least one source, or set data.prepared")
    sources = []
    for i, src in enumerate(cfg.sources):
        entry = {"kind": src.kind, "inputs": fingerprint(src, f"data.sources[{i}]")}
        if src.kind in ("text", "jsonl", "parquet"):
            entry.update(glob=src.glob, field=src.field if src.kind != "text" else None)
        sources.append(entry)
    if cfg.tokenizer.path:
        tok_path = Path(cfg.tokenizer.path).expanduser()
        if not tok_path.is_file():
            raise DataError(f"data.tokenizer.path: {tok_path} does not exist")
        st = tok_path.stat()
        tok = {"path": str(tok_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        specials = Tokenizer.load(tok_path).specials
        if specials.origin:  # BOS and EOS shape the token stream; a default tokenizer keeps its old key
            tok["special_tokens"] = [specials.eos_id, specials.bos_id, specials.add_bos]
    else:
        # The special tokens a trained BPE reserves are part of its identity (the ChatML pair was added later).
        tok = {"vocab_size": cfg.tokenizer.vocab_size, "train_bytes": cfg.tokenizer.train_bytes,
               "specials": list(TRAINED_SPECIALS)}
        if cfg.tokenizer.split_digits:  # only when set: every earlier cache keeps its key
            tok["split_digits"] = True
    identity = {"format_version": FORMAT_VERSION, "sources": sources, "tokenizer": tok,
                "val_fraction": cfg.val_fraction}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    kinds = "+".join(dict.fromkeys(src.kind for src in cfg.sources))  # readable, in data_cache/ listings
    return f"{kinds}-{digest}"


def resolve_dataset(cfg: DataConfig, log: Log = print) -> Path:
    """The dataset directory for cfg: data.prepared if set, else the cache entry, prepared if missing."""
    if cfg.prepared:
        path = Path(cfg.prepared).expanduser()
        if not (path / MANIFEST).is_file():
            raise DataError(f"data.prepared: {path} is not a prepared dataset (no {MANIFEST}); "
                            "run stagewise data prepare")
        return path
    path = Path(cfg.cache_dir).expanduser() / dataset_key(cfg)
    if (path / MANIFEST).is_file():
        log(f"data: using cached {path}")
        return path
    return _prepare(cfg, path, log, overwrite=False)


# ----------------------------------------------------------------------------- open

@dataclass
class TokenDataset:
    path: Path
    train: np.ndarray  # read-only memmaps of token ids
    val: np.ndarray
    tokenizer: Tokenizer
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id


def open_dataset(path: str | Path, expect_tokenizer_sha: Optional[str] = None) -> TokenDataset:
    """Open a prepared dataset, verifying every file against its manifest."""
    path = Path(path).expanduser()
    where = f"dataset {path}"
    if not path.is_dir():
        raise DataError(f"{where} does not exist ({REPREPARE})")
    manifest = _read_manifest(path, where)
    dtype = np.dtype(manifest["dtype"])
    arrays = {}
    for split in SPLITS:
        meta = manifest["splits"][split]
        file = path / meta["file"]
        if not file.is_file():
            raise DataError(f"{where}: {meta['file']} is missing ({REPREPARE})")
        size = file.stat().st_size
        if size % dtype.itemsize or size // dtype.itemsize != meta["tokens"]:
            has = f"{size // dtype.itemsize} tokens" if size % dtype.itemsize == 0 else f"{size} bytes"
            raise DataError(f"{where}: {meta['file']} has {has}, manifest says {meta['tokens']} tokens "
                            f"({REPREPARE})")
        if _file_sha256(file) != meta["sha256"]:
            raise DataError(f"{where}: {meta['file']} does not match its sha256 in {MANIFEST} "
                            f"(corrupted or modified; {REPREPARE})")
        # np.memmap cannot map an empty file; an empty split is still a valid (useless) array.
        arrays[split] = np.memmap(file, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    tokenizer = Tokenizer.load(path / manifest.get("tokenizer_file", TOKENIZER_FILE))
    if tokenizer.sha256 != manifest["tokenizer_sha256"]:
        raise DataError(f"{where}: {TOKENIZER_FILE} sha256 {tokenizer.sha256[:12]} does not match "
                        f"{MANIFEST} ({manifest['tokenizer_sha256'][:12]}); it was modified ({REPREPARE})")
    if (tokenizer.vocab_size, tokenizer.eos_id) != (manifest["vocab_size"], manifest["eos_id"]):
        raise DataError(f"{where}: {MANIFEST} vocab_size/eos_id {manifest['vocab_size']}/{manifest['eos_id']} "
                        f"disagree with {TOKENIZER_FILE} ({tokenizer.vocab_size}/{tokenizer.eos_id}) ({REPREPARE})")
    specials = tokenizer.specials.to_json(tokenizer.backend) if tokenizer.specials.origin else None
    if manifest.get("special_tokens") != specials:
        raise DataError(f"{where}: {MANIFEST} special_tokens disagree with {SPECIALS_FILE} beside "
                        f"{TOKENIZER_FILE} ({REPREPARE})")
    if expect_tokenizer_sha is not None and tokenizer.sha256 != expect_tokenizer_sha:
        raise DataError(f"{where}: tokenizer sha256 {tokenizer.sha256[:12]} differs from the expected "
                        f"{expect_tokenizer_sha[:12]} (the model was trained with another tokenizer; "
                        "prepare the data with that tokenizer via data.tokenizer.path)")
    return TokenDataset(path, arrays["train"], arrays["val"], tokenizer, manifest)


def _read_manifest(path: Path, where: str) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"{where}: no {MANIFEST} (not a prepared dataset, or preparation was interrupted; "
                        f"{REPREPARE})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: {MANIFEST} is not valid JSON ({e}; {REPREPARE})") from None
    expected = {"format_version": int, "dtype": str, "vocab_size": int, "eos_id": int,
                "tokenizer_sha256": str, "splits": dict}
    for key, typ in expected.items():
        if not isinstance(manifest.get(key) if isinstance(manifest, dict) else None, typ):
            raise DataError(f"{where}: {MANIFEST} lacks a valid {key!r} ({REPREPARE})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{where}: format_version {manifest['format_version']} is not supported "
                        f"(this stagewise reads {FORMAT_VERSION}; {REPREPARE})")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{where}: dtype {manifest['dtype']!r} is not uint16 or uint32 ({REPREPARE})")
    for split in SPLITS:
        meta = manifest["splits"].get(split)
        ok = isinstance(meta, dict) and isinstance(meta.get("tokens"), int) and isinstance(meta.get("sha256"), str)
        # A bare file name only: a manifest must not point outside its own directory.
        if not (ok and isinstance(meta.get("file"), str) and Path(meta["file"]).name == meta["file"]):
            raise DataError(f"{where}: {MANIFEST} lacks a valid splits.{split} entry ({REPREPARE})")
    return manifest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
