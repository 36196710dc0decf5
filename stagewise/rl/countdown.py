"""The Countdown numbers game (as in TinyZero's RL task): make a target from given numbers.

A puzzle is a multiset of numbers and a positive integer target that some expression over the
numbers with + - * / and parentheses equals exactly. It is generated backwards: draw the numbers,
build a random expression from them (all of them with `use_all`, else a random subset of at least
two, so the target is never simply one of the numbers), evaluate it exactly and keep it if the value
is a positive integer. That expression is the puzzle's reference solution.

Which split a puzzle belongs to is a hash of its sorted numbers and target, so the train set of any
seed never holds a val puzzle (nor the same puzzle with its numbers shown in another order).

The verifier never evaluates the text as Python. It parses it with `ast` and accepts only binary
+ - * / (those allowed) over non-negative decimal integer literals, which must be drawn from the
given numbers; the value is computed with `Fraction`, so 7/2*2 is 7 exactly and never 6.999...
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

OPS = ("+", "-", "*", "/")
SPLIT_SALT = "countdown/"
MAX_CHARS = 200
MAX_DEPTH = 32  # levels of the expression tree, a literal included: n numbers need at most n

_AST_OP = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
# Digits, the four operators, parentheses and blanks only: names, strings, dots, hex/underscore/
# exponent literals and unicode look-alikes are refused before the parser sees them.
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t]*")
# A model may restate the target after its expression ("(3+7)*2 = 20"); only the expression is judged.
_TRAILING_RESULT = re.compile(r"\s*=\s*-?\d+\s*$")

Expr = Union[int, tuple]  # an int, or (op, left, right)


@dataclass(frozen=True)
class Puzzle:
    numbers: tuple  # in the order the prompt shows them
    target: int
    solution: str

    @property
    def split_value(self) -> float:
        """Position in [0, 1) from the sorted numbers and the target alone."""
        text = f"{SPLIT_SALT}{','.join(map(str, sorted(self.numbers)))}/{self.target}"
        digest = hashlib.sha256(text.encode("ascii")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def split(self, val_fraction: float) -> str:
        return "val" if self.split_value < val_fraction else "train"


def generate(count: int, split: str, seed: int, numbers: int = 3, max_number: int = 20,
             ops: tuple = OPS, use_all: bool = False, val_fraction: float = 0.1,
             unique: bool = True) -> list[Puzzle]:
    """`count` puzzles of one split, deterministic in all arguments. With `unique`, no two share
    their sorted numbers and target. Raises ValueError if the split runs out of puzzles."""
    # One stream per (seed, split): the val set of a seed does not change with the train count.
    rng = random.Random(f"{SPLIT_SALT}{seed}/{split}")
    out, seen = [], set()
    budget = 100 * count + 10_000
    while len(out) < count and budget > 0:
        budget -= 1
        drawn = [rng.randint(1, max_number) for _ in range(numbers)]
        used = drawn if use_all else rng.sample(drawn, rng.randint(min(2, numbers), numbers))
        used = rng.sample(used, len(used))  # the expression's order, independent of the prompt's
        tree = _random_tree(rng, used, ops)
        value = evaluate(tree)
        if value is None or value.denominator != 1 or value <= 0:
            continue
        puzzle = Puzzle(tuple(drawn), int(value), to_text(tree))
        if len(puzzle.solution) > MAX_CHARS:  # the verifier would refuse it (large numbers, many of them)
            continue
        key = (tuple(sorted(drawn)), puzzle.target)
        if puzzle.split(val_fraction) != split or (unique and key in seen):
            continue
        seen.add(key)
        out.append(puzzle)
    if len(out) < count:
        raise ValueError(f"found only {len(out)} distinct {split} puzzles with {numbers} numbers up to "
                         f"{max_number} and ops {list(ops)}, {count} requested; lower the count, raise "
                         f"numbers or max_number, or set unique to false")
    return out


def _random_tree(rng: random.Random, leaves: list[int], ops: tuple) -> Expr:
    """A uniformly random split point at every node gives every bracketing a chance."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    return (rng.choice(ops), _random_tree(rng, leaves[:cut], ops), _random_tree(rng, leaves[cut:], ops))


def evaluate(tree: Expr) -> Optional[Fraction]:
    """The exact value, or None on a division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = evaluate(left), evaluate(right)
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def to_text(tree: Expr) -> str:
    """Infix with only the parentheses precedence needs. A right operand of the same precedence
    keeps them only under - and / (a+(b-c) is a+b-c, a-(b-c) is not); in exact arithmetic
    a*(b/c) == a*b/c, so the text always evaluates to the tree's value."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = to_text(left), to_text(right)
    if isinstance(left, tuple) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    if isinstance(right, tuple) and (_PRECEDENCE[right[0]] < _PRECEDENCE[op]
                                     or (_PRECEDENCE[right[0]] == _PRECEDENCE[op] and op in "-/")):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def prompt(numbers, target: int, ops: tuple, use_all: bool) -> str:
    each = "each exactly once" if use_all else "each at most once"
    return (f"Using the numbers {', '.join(map(str, numbers))}, {each}, with {' '.join(ops)} and "
            f"parentheses, make {target}. Reply with the expression only.")


def answer_line(completion: str) -> str:
    """The first non-blank line: the expression; what follows (an end-of-turn marker, more text) is ignored."""
    lines = completion.lstrip().splitlines()
    return lines[0] if lines else ""


def parse_expression(text: str, numbers, ops=OPS, use_all: bool = False) -> Optional[Fraction]:
    """The exact value of `text` as a Countdown answer over `numbers`, or None if it is refused:
    anything but + - * / (among `ops`) over integer literals, a literal not among the numbers or
    used more often than given (with `use_all`, not using each exactly as often as given), more than
    MAX_CHARS characters or MAX_DEPTH levels of nesting, or a division by zero."""
    text = _TRAILING_RESULT.sub("", text.strip())
    if not text or len(text) > MAX_CHARS or not _ALLOWED_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    expr = _to_tree(tree.body, set(ops), 1)
    if expr is None:
        return None
    used, given = Counter(_leaves(expr)), Counter(numbers)
    if (used != given) if use_all else not used <= given:
        return None
    return evaluate(expr)


def _to_tree(node: ast.AST, ops: set, depth: int) -> Optional[Expr]:
    """The whitelist walk: every node type not named here is refused."""
    if depth > MAX_DEPTH:
        return None
    if isinstance(node, ast.Constant):
        # type(...) is int, not isinstance: True and False are ints to Python.
        return node.value if type(node.value) is int and node.value >= 0 else None
    if isinstance(node, ast.BinOp) and _AST_OP.get(type(node.op)) in ops:
        left = _to_tree(node.left, ops, depth + 1)
        right = _to_tree(node.right, ops, depth + 1)
        if left is None or right is None:
            return None
        return (_AST_OP[type(node.op)], left, right)
    return None


def _leaves(tree: Expr) -> list[int]:
    if isinstance(tree, int):
        return [tree]
    return _leaves(tree[1]) + _leaves(tree[2])
