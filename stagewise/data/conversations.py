"""Rows of a chat dataset -> `Conversation`s, for supervised fine-tuning.

Reads JSONL and Parquet files (one file, or a directory and a glob, as data/sources.py does) and
local Hugging Face `datasets` directories written by `save_to_disk`. Four row formats, detected per
file from the first row's fields unless `format` forces one:

  messages           {"messages": [{"role", "content"}, ...]}            roles system/user/assistant/tool
  prompt-completion  {"prompt": str | messages, "completion": str | messages}    (TRL's two kinds)
  alpaca             {"instruction", "input" (optional), "output"}
  sharegpt           {"conversations": [{"from", "value"}, ...]}     human/gpt/system (role/content too)

A prompt/completion row becomes [prompt..., completion...] with `completion_only` set: TRL trains
only the completion there, where a messages row trains every assistant turn. Fields a format does
not use (an `answer` column for a reward, an id) are kept in `extra`. Every error is one line that
names the file and the row (1-based; a JSONL row is its line number, what an editor shows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from stagewise.data.sources import _walk
from stagewise.errors import DataError

FORMATS = ("messages", "prompt-completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
SUFFIXES = (".jsonl", ".parquet")
# What `save_to_disk` writes: a Dataset (state.json + dataset_info.json) or a DatasetDict.
_HF_DATASET_FILES = (("state.json", "dataset_info.json"), ("dataset_dict.json",))


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]  # {"role", "content": str, ...any other keys the row's message had}
    source: str  # "file:row", for errors further down (a template that fails on this row)
    completion_only: bool = False  # train only the final assistant message (a prompt/completion row)
    extra: dict = field(default_factory=dict)  # the row's fields the format does not use


def read_conversations(path: str | Path, glob: Optional[str] = None, format: Optional[str] = None,
                       split: Optional[str] = None, require_assistant: bool = True,
                       where: Optional[str] = None) -> Iterator[Conversation]:
    """The conversations of a file, a directory of files (sorted, matching `glob`, default *.jsonl
    and *.parquet) or a `save_to_disk` directory (its `split`, default "train", for a DatasetDict).
    `require_assistant=False` accepts prompt-only rows (for generation, not SFT). `where` (e.g.
    "sft.data") prefixes errors."""
    prefix = f"{where}: " if where else ""
    if format is not None and format not in FORMATS:
        raise DataError(f"{prefix}unknown conversation format {format!r}; valid: {', '.join(FORMATS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"{prefix}{root} does not exist")
    n = 0
    for name, rows in _row_sources(root, glob, split, prefix):
        fmt = format
        for row_no, row in rows:
            source = f"{name}:{row_no}"
            fmt = fmt or detect_format(row, f"{prefix}{source}")  # the first row decides for the file
            n += 1
            yield conversation_from_row(row, source, fmt, require_assistant, prefix)
    if n == 0:
        raise DataError(f"{prefix}{root} contains no conversations (every matched file is empty)")


def detect_format(row: dict, where: str) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row:
        return "prompt-completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    fields = ", ".join(sorted(row)[:10]) or "none"
    raise DataError(f"{where}: cannot tell the conversation format from the fields ({fields}); expected "
                    "messages, prompt + completion, instruction + output (alpaca) or conversations "
                    f"(sharegpt), or set the format ({' | '.join(FORMATS)})")


def conversation_from_row(row: dict, source: str, format: str, require_assistant: bool = True,
                          prefix: str = "") -> Conversation:
    """One row (a dict) of `format` as a Conversation; `source` ("file:row") names it in errors."""
    where = f"{prefix}{source}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    completion_only = format == "prompt-completion"
    if format == "messages":
        used, messages = ("messages",), _messages(_field(row, "messages", where), "messages", where)
    elif format == "prompt-completion":
        used, messages = ("prompt", "completion"), _prompt_completion(row, require_assistant, where)
    elif format == "alpaca":
        used, messages = ("instruction", "input", "output"), _alpaca(row, where)
    elif format == "sharegpt":
        used, messages = ("conversations",), _sharegpt(_field(row, "conversations", where), where)
    else:
        raise DataError(f"{where}: unknown conversation format {format!r}; valid: {', '.join(FORMATS)}")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to train on (roles: "
                        f"{', '.join(m['role'] for m in messages) or 'none'}); SFT needs at least one")
    extra = {k: v for k, v in row.items() if k not in used and v is not None}  # a Parquet null is no field
    return Conversation(messages, source, completion_only, extra)


# ------------------------------------------------------------------------------------- row formats

def _field(row: dict, name: str, where: str) -> Any:
    if row.get(name) is None:
        fields = ", ".join(sorted(k for k, v in row.items() if v is not None)[:10]) or "none"
        raise DataError(f"{where}: no field {name!r} (fields: {fields})")
    return row[name]


def _messages(value: Any, name: str, where: str) -> list[dict]:
    """A list of {role, content} messages, checked; other keys are kept (minus nulls, which a
    Parquet struct column fills in for every key some other row has)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: {name!r} must be a non-empty list of {{role, content}} messages, "
                        f"got {_kind(value)}")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {name}[{i}] must be an object with role and content, got {_kind(m)}")
        m = {k: v for k, v in m.items() if v is not None}
        _check_message(m, f"{where}: {name}[{i}]")
        out.append(m)
    return out


def _check_message(m: dict, where: str) -> None:
    if m.get("role") not in ROLES:
        raise DataError(f"{where}: unknown role {m.get('role')!r}; valid roles: {', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
        raise DataError(f"{where}: content must be a string, got {_kind(m.get('content'))}")


def _turns(value: Any, role: str, name: str, where: str) -> list[dict]:
    """A prompt or completion: a string (one `role` message) or a list of messages (conversational)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, name, where)


def _prompt_completion(row: dict, require_assistant: bool, where: str) -> list[dict]:
    messages = _turns(_field(row, "prompt", where), "user", "prompt", where)
    if not require_assistant and row.get("completion") is None:
        return messages
    completion = _turns(_field(row, "completion", where), "assistant", "completion", where)
    if not any(m["role"] == "assistant" for m in completion):  # what completion_only trains
        raise DataError(f"{where}: the completion has no assistant message (roles: "
                        f"{', '.join(m['role'] for m in completion)}); it is what SFT trains on")
    return messages + completion


def _alpaca(row: dict, where: str) -> list[dict]:
    parts = {}
    for name in ("instruction", "input", "output"):
        value = row.get(name)
        if value is None and name != "input":
            raise DataError(f"{where}: no field {name!r} (alpaca rows need instruction and output)")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {name!r} must be a string, got {_kind(value)}")
        parts[name] = value or ""
    user = parts["instruction"] + ("\n\n" + parts["input"] if parts["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": parts["output"]}]


def _sharegpt(value: Any, where: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns, "
                        f"got {_kind(value)}")
    out = []
    for i, turn in enumerate(value, start=1):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with from and value, got {_kind(turn)}")
        turn = {k: v for k, v in turn.items() if v is not None}
        if "from" not in turn and "role" in turn:  # many "sharegpt" sets use role/content turns
            _check_message(turn, at)
            out.append(turn)
            continue
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"{at}: unknown 'from' {turn.get('from')!r}; valid: {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{at}: value must be a string, got {_kind(turn.get('value'))}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, (list, tuple)) and not value:
        return "an empty list"
    return type(value).__name__


# ------------------------------------------------------------------------------------------ readers

def _row_sources(root: Path, glob: Optional[str], split: Optional[str],
                 prefix: str) -> Iterator[tuple[str, Iterable[tuple[int, dict]]]]:
    """(name used in errors, iterator of (1-based row, row)) per file, in a deterministic order."""
    if root.is_dir() and _is_hf_dataset(root):
        yield from _hf_dataset_rows(root, split, prefix)
        return
    if root.is_file():
        files = [root]
    else:
        files = [f for f in _walk(root, glob, frozenset()) if glob or f.suffix in SUFFIXES]
        if not files:
            what = f"files matching {glob!r}" if glob else "*.jsonl or *.parquet files"
            raise DataError(f"{prefix}{root} contains no conversations (no {what})")
    for f in files:
        if f.suffix == ".jsonl":
            yield str(f), _jsonl_rows(f, prefix)
        elif f.suffix == ".parquet":
            yield str(f), _parquet_rows(f, prefix)
        else:
            raise DataError(f"{prefix}{f}: not a conversation file; expected .jsonl, .parquet or a "
                            "datasets save_to_disk directory")


def _jsonl_rows(f: Path, prefix: str) -> Iterator[tuple[int, dict]]:
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) hold no row
            try:
                row = json.loads(raw)
            except UnicodeDecodeError as e:
                raise DataError(f"{prefix}{f}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{prefix}{f}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{prefix}{f}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _parquet_rows(f: Path, prefix: str) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{prefix}{f}: reading parquet needs pyarrow; pip install stagewise[parquet]") from None
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{prefix}{f} is not a readable parquet file ({_first_line(e)})") from None
    row_no = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _is_hf_dataset(root: Path) -> bool:
    return any(all((root / name).is_file() for name in names) for names in _HF_DATASET_FILES)


def _hf_dataset_rows(root: Path, split: Optional[str], prefix: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{prefix}{root} is a Hugging Face datasets directory (save_to_disk); reading it "
                        "needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError or arrow errors alike
        raise DataError(f"{prefix}{root}: not a readable datasets directory ({_first_line(e)})") from None
    name = str(root)
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds) or "none"
        if split is None and "train" not in ds:
            raise DataError(f"{prefix}{root} holds splits {splits} and none named 'train'; choose a split")
        if (split or "train") not in ds:
            raise DataError(f"{prefix}{root} has no split {split!r} (splits: {splits})")
        split = split or "train"
        ds, name = ds[split], f"{root}[{split}]"
    yield name, ((i, row) for i, row in enumerate(ds, start=1))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
