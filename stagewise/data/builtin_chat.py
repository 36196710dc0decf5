"""Built-in, offline chat datasets for supervised fine-tuning.

  python-docstrings  stdlib functions with docstrings: user = signature + docstring, assistant = body
  arithmetic         seeded addition / multiplication problems (stagewise.data.arithmetic)

Every conversation is a dict `{"messages": [user, assistant], "split": "train"|"val", "id": str, ...}`
in a deterministic order. Splits are decided by hashing an item's identity (a module path, a
problem's operands), never by position, so no module or problem is ever in both splits.

python-docstrings choices:
  * The user turn is a one-line instruction, a blank line, then the source from the first decorator
    through the closing docstring line, exactly as written (decorators are kept: `@property` or
    `@classmethod` changes what the body may do). The assistant turn is the rest of the function's
    lines, comments included, indented as they sit under the `def` (methods are dedented by the
    class's indent), so `code prompt + "\n" + body` parses back to the original function.
  * Only module- and class-level functions are taken (also inside module-level `if`/`try`);
    functions nested in functions are part of their parent's body and depend on its closure.
  * Skipped: empty docstrings, stub bodies (only `pass`, `...`, `raise NotImplementedError`),
    bodies over `max_body_chars`, code after the docstring on its own line, files that fail to
    decode or parse. Modules are parsed with `ast`, never imported.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from typing import Iterable, Iterator, Optional

from stagewise.data.sources import _decode, _stdlib_files, _stdlib_root
from stagewise.errors import DataError

NAMES = ("python-docstrings", "arithmetic")
# Bump when the rendering of either dataset changes, so callers' caches keyed on
# fingerprint() are rebuilt instead of serving conversations in an old format.
FORMAT_VERSION = 1
DOCSTRING_SPLIT_SALT = "python-docstrings/"


def builtin_conversations(name: str, **options) -> list[dict]:
    """All conversations (both splits) of the built-in chat dataset `name`."""
    if name == "python-docstrings":
        fn = python_docstring_conversations
    elif name == "arithmetic":
        from stagewise.data.arithmetic import conversations as fn
    else:
        raise DataError(f"unknown built-in chat dataset {name!r}; valid: {', '.join(NAMES)}")
    try:
        return fn(**options)
    except TypeError as e:  # an unknown keyword: name it and the valid ones in one line
        raise DataError(f"built-in chat dataset {name!r}: {e}") from None


def fingerprint(name: str, **options) -> list:
    """A JSON-able cache key: what the conversations depend on, without building them."""
    key = [name, FORMAT_VERSION, sorted(options.items())]
    if name == "python-docstrings":
        key += [_stdlib_root().as_posix(), sys.version]
    return key


def split_counts(conversations: Iterable[dict]) -> dict[str, int]:
    counts = {"train": 0, "val": 0}
    for c in conversations:
        counts[c["split"]] += 1
    return counts


# ----------------------------------------------------------------------------- python-docstrings

def python_docstring_conversations(max_body_chars: int = 4000, val_fraction: float = 0.05,
                                   modules: Optional[Iterable[str]] = None) -> list[dict]:
    """Chat pairs from the running interpreter's stdlib (as sources.py finds it), in file then
    source order. `modules` restricts the scan to these paths relative to the stdlib root
    (e.g. ["textwrap.py", "json/decoder.py"]), for tests and quick looks."""
    if max_body_chars < 1:
        raise DataError(f"python-docstrings: max_body_chars must be >= 1, got {max_body_chars}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"python-docstrings: val_fraction must be in [0, 1), got {val_fraction}")
    root, files = _stdlib_files()
    if modules is not None:
        wanted = set(modules)
        files = [f for f in files if f.relative_to(root).as_posix() in wanted]
        missing = wanted - {f.relative_to(root).as_posix() for f in files}
        if missing:
            raise DataError(f"python-docstrings: no stdlib module file {sorted(missing)[0]!r} under {root}")
    out = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            text = _decode(f.read_bytes(), f, "python-docstrings")
        except DataError:
            continue  # a non-UTF-8 file (none in CPython today) has nothing we could render
        out.extend(docstring_conversations(text, rel, max_body_chars, module_split(rel, val_fraction)))
    return out


def module_split(rel_path: str, val_fraction: float) -> str:
    """A module's split from its path alone, so adding modules never moves another one."""
    digest = hashlib.sha256((DOCSTRING_SPLIT_SALT + rel_path).encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else "train"


def module_name(rel_path: str) -> str:
    parts = rel_path[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def docstring_conversations(source: str, rel_path: str, max_body_chars: int = 4000,
                            split: str = "train") -> list[dict]:
    """The conversations of one module's source text; [] if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a NUL byte in the source
        return []
    lines = source.splitlines()
    module = module_name(rel_path)
    out, seen = [], {}
    for qualname, node in _functions(tree.body, ""):
        pair = _render(node, lines, max_body_chars)
        if pair is None:
            continue
        code, body = pair
        # Platform variants (`if sys.platform == ...: def f` / `else: def f`) share a qualname.
        seen[qualname] = seen.get(qualname, 0) + 1
        suffix = f"#{seen[qualname]}" if seen[qualname] > 1 else ""
        # The qualname says which class a method belongs to, which the `def` line alone does not.
        instruction = (f"Write the body of this Python function, `{qualname}` from the standard library "
                       f"module `{module}`.")
        out.append({
            "messages": [{"role": "user", "content": f"{instruction}\n\n{code}"},
                         {"role": "assistant", "content": body}],
            "split": split, "id": f"{rel_path}::{qualname}{suffix}",
            "module": module, "qualname": qualname,
        })
    return out


_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
# Blocks a module or class body may define functions inside without making them closures.
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers")


def _functions(body: list, prefix: str) -> Iterator[tuple[str, ast.AST]]:
    for node in body:
        if isinstance(node, _FUNCS):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ExceptHandler)) or type(node).__name__ == "TryStar":
            for field in _BLOCK_FIELDS:
                yield from _functions(getattr(node, field, []), prefix)


def _render(node, lines: list[str], max_body_chars: int) -> Optional[tuple[str, str]]:
    """(code prompt, body) of a function, or None when it should be skipped."""
    doc = node.body[0] if node.body else None
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str) and doc.value.value.strip()):
        return None
    rest = node.body[1:]
    if not rest or all(_is_stub(s) for s in rest):
        return None
    # ast column offsets count UTF-8 bytes, not characters.
    after_doc = lines[doc.end_lineno - 1].encode("utf-8")[doc.end_col_offset:].decode("utf-8").strip()
    if (after_doc and not after_doc.startswith("#")) or rest[0].lineno == doc.end_lineno:
        return None  # `"""doc"""; x = 1`: the body starts inside the prompt's last line
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    first = lines[start - 1]
    indent = first[:len(first) - len(first.lstrip())]
    code = _dedent(lines[start - 1:doc.end_lineno], indent)
    body_lines = _dedent(lines[doc.end_lineno:node.end_lineno], indent).splitlines()
    while body_lines and not body_lines[0].strip():  # the blank line after a docstring is layout
        body_lines.pop(0)
    body = "\n".join(body_lines).rstrip()
    if not body or len(body) > max_body_chars:
        return None
    return code, body


def _dedent(lines: list[str], indent: str) -> str:
    """Strip the def's own indent; lines without it (inside a multi-line string) stay verbatim."""
    out = []
    for line in lines:
        if line.startswith(indent):
            out.append(line[len(indent):])
        else:  # whitespace-only lines shorter than the indent become empty, as dedent() does
            out.append(line if line.strip() else "")
    return "\n".join(out)


def _is_stub(stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True  # `...` or a second string
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False
