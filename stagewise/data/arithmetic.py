"""Seeded addition and multiplication problems in chat form, with an exact checker.

Answer formats follow "Teaching Arithmetic to Small Transformers" (Lee et al. 2023):

  plain       user "128+367="  assistant "495"
  reversed    user "128+367="  assistant "594"   (the answer's digits reversed: a model then emits
              the least significant digit first, the order carries propagate in, which the paper
              found is learned with far fewer samples)
  scratchpad  a simplified version of the paper's detailed scratchpad: one line per digit (addition)
              or per partial product (multiplication), then a final line "answer: 495"

Which split a problem belongs to is a hash of the unordered operand pair and the operation (not the
format, not the seed), so a train set of any seed or format never contains a val problem, nor its
commuted twin (367+128). `check()` and `extract_answer()` are the verifiable reward for RL: only the
final answer is judged, exactly as a digit string, and text after it (an end-of-turn marker,
trailing whitespace) is ignored.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from typing import Optional

from stagewise.errors import DataError

OPS = ("add", "mul")
FORMATS = ("plain", "reversed", "scratchpad")
SPLIT_SALT = "arithmetic/"
_SYMBOL = {"add": "+", "mul": "*"}
_LEADING_NUMBER = re.compile(r"\s*(\d+)")
# The first answer line wins: a later one would sit after the end of turn, where a policy being
# rewarded could otherwise append guesses.
_ANSWER_LINE = re.compile(r"^[ \t]*answer:[ \t]*(\d+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str = "add"
    fmt: str = "plain"

    def __post_init__(self):
        if self.op not in OPS:
            raise DataError(f"arithmetic: unknown op {self.op!r}; valid: {', '.join(OPS)}")
        if self.fmt not in FORMATS:
            raise DataError(f"arithmetic: unknown format {self.fmt!r}; valid: {', '.join(FORMATS)}")
        if self.a < 0 or self.b < 0:
            raise DataError(f"arithmetic: operands must be non-negative, got {self.a} and {self.b}")

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "add" else self.a * self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{_SYMBOL[self.op]}{self.b}="

    @property
    def answer_text(self) -> str:
        """The final answer as the checker expects it in this format's answer position."""
        s = str(self.value)
        return s[::-1] if self.fmt == "reversed" else s

    @property
    def target(self) -> str:
        """The assistant turn."""
        if self.fmt != "scratchpad":
            return self.answer_text
        steps = _add_steps(self.a, self.b) if self.op == "add" else _mul_steps(self.a, self.b)
        return "\n".join(steps + [f"answer: {self.value}"])

    @property
    def split_value(self) -> float:
        """Position in [0, 1) from the problem alone; commuted operands hash the same."""
        lo, hi = sorted((self.a, self.b))
        digest = hashlib.sha256(f"{SPLIT_SALT}{self.op}/{lo}/{hi}".encode("ascii")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def split(self, val_fraction: float) -> str:
        return "val" if self.split_value < val_fraction else "train"

    def conversation(self, split: str, id: str) -> dict:
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.target}],
                "split": split, "id": id, "answer": str(self.value), "problem": asdict(self)}

    @classmethod
    def from_conversation(cls, conv: dict) -> "Problem":
        return cls(**conv["problem"])


def _add_steps(a: int, b: int) -> list[str]:
    """Right to left, one line per digit: "8+7+0=15, write 5, carry 1"; a final carry gets its own
    0+0+1 line so every digit of the answer is written by exactly one line."""
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    steps, carry = [], 0
    for i in range(n + 1):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if i == n and carry == 0:
            break
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    """One partial product per digit of b, right to left, shifted by its place, then the running
    total: the paper's multiplication scratchpad without its list notation."""
    steps, total = [], 0
    for place, d in enumerate(reversed(str(b))):
        factor = f"{d}{'0' * place}" if d != "0" else "0"
        part = a * int(factor)
        steps.append(f"{a}*{factor}={part}, {total}+{part}={total + part}")
        total += part
    return steps


def extract_answer(completion: str, fmt: str) -> Optional[int]:
    """The integer a completion answers, or None if it has no answer where the format puts one."""
    token = _answer_token(completion, fmt)
    if token is None:
        return None
    return int(token[::-1] if fmt == "reversed" else token)


def check(completion: str, problem: Problem) -> bool:
    """True iff the completion's answer is exactly the problem's, digit for digit (so "0495" and,
    for reversed, "5940" are wrong: the format is part of what is learned)."""
    return _answer_token(completion, problem.fmt) == problem.answer_text


def _answer_token(completion: str, fmt: str) -> Optional[str]:
    if fmt not in FORMATS:
        raise DataError(f"arithmetic: unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    m = (_ANSWER_LINE.search if fmt == "scratchpad" else _LEADING_NUMBER.match)(completion)
    return m.group(1) if m else None


def generate(count: int, split: str = "train", ops: tuple = ("add",), digits: tuple = (1, 3),
             fmt: str = "plain", seed: int = 0, val_fraction: float = 0.1, unique: bool = True) -> list[Problem]:
    """`count` problems of one split. Each operand's digit count is drawn uniformly from `digits`
    (min, max) and then the operand uniformly among numbers of that length, as the paper balances
    digit counts; otherwise 1-digit problems would be ~1% of a 1..3 digit set."""
    ops, (lo, hi) = tuple(ops), tuple(digits)
    _validate(count, split, ops, lo, hi, fmt, val_fraction)
    # One stream per (seed, split): the val set of a seed does not change with the train count.
    rng = random.Random(f"{SPLIT_SALT}{seed}/{split}")
    out, seen = [], set()
    budget = 100 * count + 10_000  # enough unless the split's problem space is nearly exhausted
    while len(out) < count and budget > 0:
        budget -= 1
        p = Problem(_operand(rng, lo, hi), _operand(rng, lo, hi), rng.choice(ops), fmt)
        key = (p.op, p.a, p.b)
        if p.split(val_fraction) != split or (unique and key in seen):
            continue
        seen.add(key)
        out.append(p)
    if len(out) < count:
        raise DataError(f"arithmetic: found only {len(out)} distinct {split} problems with digits {lo}..{hi} "
                        f"and ops {list(ops)}, {count} requested; lower the count, raise the digits or set unique=False")
    return out


def conversations(train_count: int = 10_000, val_count: int = 500, ops: tuple = ("add",),
                  digits: tuple = (1, 3), fmt: str = "plain", seed: int = 0,
                  val_fraction: float = 0.1, unique: bool = True) -> list[dict]:
    """Train then val conversations, each with "answer" (the value as a string) and "problem"."""
    out = []
    for split, count in (("train", train_count), ("val", val_count)):
        problems = generate(count, split, ops, digits, fmt, seed, val_fraction, unique)
        out.extend(p.conversation(split, f"arithmetic/{fmt}/{seed}/{split}/{i}") for i, p in enumerate(problems))
    return out


def _operand(rng: random.Random, lo: int, hi: int) -> int:
    n = rng.randint(lo, hi)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)


def _validate(count, split, ops, lo, hi, fmt, val_fraction) -> None:
    if count < 0:
        raise DataError(f"arithmetic: count must be >= 0, got {count}")
    if split not in ("train", "val"):
        raise DataError(f"arithmetic: split must be 'train' or 'val', got {split!r}")
    if not ops or any(op not in OPS for op in ops):
        raise DataError(f"arithmetic: ops {list(ops)} invalid; choose from {', '.join(OPS)}")
    if not 1 <= lo <= hi:
        raise DataError(f"arithmetic: digits must be (min, max) with 1 <= min <= max, got ({lo}, {hi})")
    if fmt not in FORMATS:
        raise DataError(f"arithmetic: unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"arithmetic: val_fraction must be in (0, 1), got {val_fraction}")
