"""Preference data for the `dpo` stage kind: rows -> encoded pairs -> packed or padded batches.

Rows (JSONL, Parquet, a local `datasets` directory; TRL's column names):

  paired     {"prompt", "chosen", "rejected"}   each a string or a list of {role, content} messages
             (a string prompt is a user turn, a string response an assistant turn); without a
             prompt, chosen and rejected are whole conversations and the prompt is their common
             leading messages (TRL's "implicit prompt")
  unpaired   {"prompt", "completion", "label"}  label true (desirable) or false, for kto

kto reads either: a paired row becomes one desirable and one undesirable example. Every error
(a missing field, an empty response, a pair whose chosen equals its rejected) is one line naming
the file and row.

Each response is rendered after its prompt with the tokenizer's chat template (data/chat.py)
and only the final assistant message (with its end-of-turn token) is trained: the prompt is
masked. A training *unit* is two sequences that must share a micro-batch: a pair (chosen,
rejected) or, for kto, an example and its KL sequence (the example's prompt with another
example's completion, fixed per split: KTO's estimate of the policy/reference KL).

Built-in, verifiable preference sets:
  arithmetic         chosen = the right answer, rejected = a plausible wrong one (a dropped carry,
                     one digit off by one, or off by one), drawn per problem from its operands
  python-docstrings  chosen = the function's real body, rejected = the body of another
                     function of the same module (both real, stdlib code)

Batching lives in data/preference_batches.py.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from stagewise.data.batch import IGNORE_INDEX
from stagewise.data.chat import ChatTemplate, require_template
from stagewise.data.conversations import _messages, _row_sources
from stagewise.data.sft_data import Example, fit_length, row_split
from stagewise.data.tokenizer import Tokenizer
from stagewise.errors import DataError



@dataclass(frozen=True)
class PreferenceRow:
    """A row as read: prompt messages and two responses (paired), or one response and a label."""
    prompt: list
    first: list          # chosen (paired) or completion (unpaired): messages ending in the trained reply
    second: Optional[list]  # rejected (paired), None for an unpaired row
    label: Optional[bool]   # unpaired only
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.second is not None


@dataclass
class Unit:
    """Two encoded sequences trained in the same micro-batch, with the row they came from."""
    seqs: tuple            # (Example, Example): chosen, rejected | completion, KL completion
    label: float           # 1.0 a pair or a desirable example, 0.0 an undesirable one
    source: str
    extra: dict = field(default_factory=dict)

    def lengths(self) -> tuple[int, int]:
        return len(self.seqs[0].inputs), len(self.seqs[1].inputs)


@dataclass
class PreferenceData:
    train: list
    val: list
    template: ChatTemplate
    paired: bool                                  # units are pairs (else kto examples with KL sequences)
    stats: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of every unit's tokens and targets, train then val: what precomputed reference
        log-probs are keyed on (with the reference weights)."""
        h = hashlib.sha256(b"stagewise-preference-v1" + bytes([self.paired]))
        for split in (self.train, self.val):
            h.update(str(len(split)).encode())
            for u in split:
                for ex in u.seqs:
                    h.update(np.int64(len(ex.inputs)).tobytes())
                    h.update(ex.inputs.tobytes())
                    h.update(ex.targets.tobytes())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------ rows

def read_preference_rows(path, glob=None, split=None, where: str = "dpo.data") -> Iterator[PreferenceRow]:
    from pathlib import Path

    root = Path(path).expanduser()
    prefix = f"{where}: "
    if not root.exists():
        raise DataError(f"{prefix}{root} does not exist")
    n = 0
    for name, rows in _row_sources(root, glob, split, prefix):
        for row_no, row in rows:
            n += 1
            yield row_from_dict(row, f"{name}:{row_no}", prefix)
    if n == 0:
        raise DataError(f"{prefix}{root} contains no rows (every matched file is empty)")


def row_from_dict(row: dict, source: str, prefix: str = "") -> PreferenceRow:
    """One row as a PreferenceRow; DataError (one line naming `source`) when it is not a valid one."""
    where = f"{prefix}{source}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    present = {k for k, v in row.items() if v is not None}
    if "chosen" in present or "rejected" in present:
        for name in ("chosen", "rejected"):
            if name not in present:
                raise DataError(f"{where}: no field {name!r} (a paired row needs prompt, chosen and rejected; "
                                f"fields: {', '.join(sorted(present)) or 'none'})")
        prompt, chosen, rejected = _paired(row, where)
        _check_response(chosen, "chosen", where)
        _check_response(rejected, "rejected", where)
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same response; a pair needs two different ones")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected") and v is not None}
        return PreferenceRow(prompt, chosen, rejected, None, source, extra)
    if "completion" in present or "label" in present:
        for name in ("prompt", "completion", "label"):
            if name not in present:
                raise DataError(f"{where}: no field {name!r} (an unpaired row needs prompt, completion and label; "
                                f"fields: {', '.join(sorted(present)) or 'none'})")
        label = row["label"]
        if not (isinstance(label, bool) or label in (0, 1)):
            raise DataError(f"{where}: label must be true (desirable) or false (undesirable), got {label!r}")
        prompt = _turns(row["prompt"], "user", "prompt", where)
        completion = _turns(row["completion"], "assistant", "completion", where)
        _check_response(completion, "completion", where)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "label") and v is not None}
        return PreferenceRow(prompt, completion, None, bool(label), source, extra)
    raise DataError(f"{where}: cannot tell the row's format from its fields ({', '.join(sorted(present)) or 'none'}); "
                    "expected prompt + chosen + rejected (paired) or prompt + completion + label (unpaired, kto)")


def _turns(value, role: str, name: str, where: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, name, where)


def _paired(row: dict, where: str) -> tuple[list, list, list]:
    if row.get("prompt") is not None:
        return (_turns(row["prompt"], "user", "prompt", where), _turns(row["chosen"], "assistant", "chosen", where),
                _turns(row["rejected"], "assistant", "rejected", where))
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise DataError(f"{where}: no field 'prompt'; without one, chosen and rejected must be whole conversations "
                        "(lists of messages) sharing their prompt")
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise DataError(f"{where}: no field 'prompt', and chosen and rejected share no leading messages to take it "
                        "from")
    return chosen[:k], chosen[k:], rejected[k:]


def _check_response(messages: list, name: str, where: str) -> None:
    if not messages or messages[-1].get("role") != "assistant":
        roles = ", ".join(m.get("role", "?") for m in messages) or "none"
        raise DataError(f"{where}: {name} must end with an assistant message (roles: {roles})")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: {name} is an empty response; every response needs some text")


# ----------------------------------------------------------------------------------- built-ins

def arithmetic_rows(train_count: int, val_count: int, ops=("add",), digits=(1, 3), fmt: str = "plain",
                    seed: int = 0) -> Iterator[tuple[str, PreferenceRow]]:
    """(split, row) of the built-in arithmetic preferences; the problems are sft's (same split)."""
    from dataclasses import asdict

    from stagewise.data.arithmetic import generate

    for split, count in (("train", train_count), ("val", val_count)):
        for i, p in enumerate(generate(count, split, tuple(ops), tuple(digits), fmt, seed)):
            wrong = wrong_answer(p)
            rejected = _render_value(p, wrong)
            yield split, PreferenceRow([{"role": "user", "content": p.prompt}],
                                       [{"role": "assistant", "content": p.target}],
                                       [{"role": "assistant", "content": rejected}], None,
                                       f"arithmetic/{fmt}/{seed}/{split}/{i}",
                                       {"answer": str(p.value), "problem": asdict(p), "wrong": wrong})


def wrong_answer(p) -> int:
    """A plausible wrong value for problem p, the same for the same problem: the sum without its
    carries (addition), one digit of the answer one off, or the answer one off."""
    v = p.value
    s = str(v)
    cands = []
    if p.op == "add":
        da, db = str(p.a)[::-1], str(p.b)[::-1]
        no_carry = "".join(str((int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0))[-1]
                           for i in range(max(len(da), len(db))))[::-1]
        cands.append(int(no_carry))
    for i in range(len(s)):
        d = int(s[i])
        for nd in (d + 1, d - 1):
            if 0 <= nd <= 9 and not (i == 0 and nd == 0 and len(s) > 1):
                cands.append(int(s[:i] + str(nd) + s[i + 1:]))
    cands += [v + 1, v - 1]
    cands = sorted({c for c in cands if c >= 0 and c != v})
    rng = random.Random(f"arithmetic-wrong/{p.op}/{p.a}/{p.b}")
    return rng.choice(cands)


def _render_value(p, value: int) -> str:
    """The assistant turn of problem p answering `value` in p's format (a scratchpad keeps its steps
    and states the wrong answer on its final line)."""
    if p.fmt == "reversed":
        return str(value)[::-1]
    if p.fmt == "plain":
        return str(value)
    steps = p.target.splitlines()[:-1]
    return "\n".join(steps + [f"answer: {value}"])


def docstring_rows(max_body_chars: int, modules=None) -> Iterator[tuple[str, PreferenceRow]]:
    """(split, row) of the built-in docstring preferences: the real body against another function's
    body from the same module (chosen by a hash of the function's id, never an identical body).
    modules: restrict to these stdlib paths (tests)."""
    from stagewise.data.builtin_chat import python_docstring_conversations

    by_module: dict = {}
    for c in python_docstring_conversations(max_body_chars=max_body_chars, modules=modules):
        by_module.setdefault(c["module"], []).append(c)
    for convs in by_module.values():
        for c in convs:
            body = c["messages"][1]["content"]
            others = [o["messages"][1]["content"] for o in convs if o["messages"][1]["content"] != body]
            if not others:
                continue
            k = int.from_bytes(hashlib.sha256(c["id"].encode()).digest()[:8], "big") % len(others)
            yield c["split"], PreferenceRow([c["messages"][0]], [c["messages"][1]],
                                            [{"role": "assistant", "content": others[k]}], None,
                                            f"python-docstrings:{c['id']}", {"module": c["module"]})


def preference_rows(dpo, where: str = "dpo") -> Iterator[tuple[str, PreferenceRow]]:
    """(split, row) of every source of a DPOConfig, in order."""
    for j, src in enumerate(dpo.data):
        at = f"{where}.data[{j}]"
        if src.kind == "arithmetic":
            a = dpo.arithmetic
            yield from arithmetic_rows(a.train_count, a.val_count, a.ops, (a.min_digits, a.max_digits), a.format,
                                       a.seed)
        elif src.kind == "python-docstrings":
            yield from docstring_rows(dpo.docstrings_max_body_chars)
        else:
            for row in read_preference_rows(src.path, src.glob, src.split, at):
                yield row_split(row.source, dpo.val_fraction), row


# ------------------------------------------------------------------------------------ encoding

def encode_response(tokenizer: Tokenizer, template: ChatTemplate, prompt: list, response: list,
                    where: str) -> Example:
    """prompt + response rendered by the chat template; targets only on the final assistant reply."""
    ids, mask = template.encode(tokenizer, prompt + response, only_last=True, where=where)
    ids = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(mask, dtype=bool)[1:], ids[1:], IGNORE_INDEX)
    return Example(ids[:-1], targets, where)


def fit_sequence(ex: Example, seq_len: int, policy: str, key: str) -> Optional[Example]:
    """ex within seq_len tokens per dpo.truncation (cutting the response's end); None when dropped or
    nothing trained is left."""
    return fit_length(ex, seq_len, policy, f"the {key} sequence", "dpo")


def load_preference_data(dpo, tokenizer: Tokenizer, seq_len: int, where: str = "dpo",
                         log=print) -> PreferenceData:
    """Every row of the stage encoded, split and fitted to seq_len, as units (pairs, or kto examples with
    their KL sequences); DataError for bad rows or a split left empty."""
    template = require_template(tokenizer, f"{where}: the tokenizer")
    kto = dpo.loss == "kto"
    rows = {"train": [], "val": []}
    for split, row in preference_rows(dpo, where):
        if not row.paired and not kto:
            raise DataError(f"{where}.data: {row.source} is an unpaired row (prompt, completion, label); loss "
                            f"{dpo.loss} needs pairs (prompt, chosen, rejected); use loss kto for unpaired data")
        rows[split].append(row)
    stats = {}
    out = {}
    for split in ("train", "val"):
        units, dropped = (_kto_units if kto else _pair_units)(rows[split], tokenizer, template, seq_len,
                                                              dpo.truncation, where)
        stats[split] = {"rows": len(rows[split]), "units": len(units), "dropped": dropped}
        if not units:
            raise DataError(f"{where}.data: no {split} {'examples' if kto else 'pairs'} left ({len(rows[split])} rows "
                            f"read, {dropped} dropped as longer than data.seq_len={seq_len}); add data, raise "
                            f"data.seq_len or dpo.val_fraction")
        out[split] = units
    log(f"{where}: {len(out['train'])} train / {len(out['val'])} val {'examples' if kto else 'pairs'}")
    return PreferenceData(out["train"], out["val"], template, not kto, stats)


def _pair_units(rows, tokenizer, template, seq_len, policy, where):
    units, dropped = [], 0
    for row in rows:
        seqs = []
        for key, response in (("chosen", row.first), ("rejected", row.second)):
            ex = encode_response(tokenizer, template, row.prompt, response, f"{where}.data: {row.source}")
            seqs.append(fit_sequence(ex, seq_len, policy, key))
        if None in seqs:
            dropped += 1
            continue
        units.append(Unit(tuple(seqs), 1.0, row.source, row.extra))
    return units, dropped


def _kto_units(rows, tokenizer, template, seq_len, policy, where):
    """Examples (a paired row gives two) with their KL sequence: the prompt with the completion of the
    next example in an order fixed by a hash of the sources (never the example's own completion)."""
    examples = []
    for row in rows:
        if row.paired:
            examples += [(row.prompt, row.first, True, f"{row.source}:chosen", row.extra),
                         (row.prompt, row.second, False, f"{row.source}:rejected", row.extra)]
        else:
            examples.append((row.prompt, row.first, row.label, row.source, row.extra))
    if len(examples) == 1:
        raise DataError(f"{where}.data: kto needs at least two examples per split (the KL estimate pairs each "
                        f"prompt with another example's completion); got one ({examples[0][3]})")
    order = sorted(range(len(examples)), key=lambda i: hashlib.sha256(examples[i][3].encode()).digest())
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    units, dropped = [], 0
    for i, (prompt, completion, label, source, extra) in enumerate(examples):
        at = f"{where}.data: {source}"
        ex = fit_sequence(encode_response(tokenizer, template, prompt, completion, at), seq_len, policy, "completion")
        kl = fit_sequence(encode_response(tokenizer, template, prompt, examples[partner[i]][1], at), seq_len,
                          "truncate", "KL")
        if ex is None or kl is None:
            dropped += 1
            continue
        units.append(Unit((ex, kl), 1.0 if label else 0.0, source, extra))
    return units, dropped
