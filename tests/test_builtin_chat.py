"""Tests for the built-in chat datasets: python-docstrings and arithmetic.

References are independent of the code under test: function bodies are cut from
`inspect.getsource` (the interpreter's own source lookup) after the docstring's closing
quotes, parseability is checked by re-parsing prompt + body with `ast`, and every
arithmetic target and scratchpad step is recomputed with Python's int arithmetic.
"""

from __future__ import annotations

import ast
import inspect
import io
import random
import re
import shlex
import textwrap
import tokenize

import pytest

from stagewise.data import arithmetic
from stagewise.data.arithmetic import FORMATS, Problem, check, extract_answer, generate
from stagewise.data.builtin_chat import (
    builtin_conversations,
    module_split,
    python_docstring_conversations,
    split_counts,
)
from stagewise.errors import DataError

# A subset keeps the test fast (the full stdlib takes a few seconds); it includes a package
# __init__, a class-heavy module and modules with decorators and platform-conditional defs.
SUBSET = ["textwrap.py", "shlex.py", "json/__init__.py", "json/decoder.py", "fractions.py",
          "functools.py", "os.py", "shutil.py", "pathlib.py", "bisect.py", "colorsys.py"]


@pytest.fixture(scope="module")
def docs():
    return python_docstring_conversations(modules=SUBSET)


def _body_from_inspect(obj) -> str:
    """The lines after the docstring's closing quotes (found by the tokenizer, not ast) in the
    source inspect finds for obj, dedented as a unit."""
    src = textwrap.dedent(inspect.getsource(obj))
    doc = next(t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.STRING)
    return "\n".join(src.splitlines()[doc.end[0]:]).strip("\n").rstrip()


@pytest.mark.parametrize("obj,item_id", [
    (textwrap.dedent, "textwrap.py::dedent"),
    (shlex.quote, "shlex.py::quote"),
    (textwrap.TextWrapper._split, "textwrap.py::TextWrapper._split"),
    (shlex.shlex.push_token, "shlex.py::shlex.push_token"),
])
def test_known_function_bodies(docs, obj, item_id):
    item = {d["id"]: d for d in docs}[item_id]
    user, body = (m["content"] for m in item["messages"])
    assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
    assert body == _body_from_inspect(obj)
    assert obj.__doc__.strip().splitlines()[0] in user
    assert f"def {obj.__name__}(" in user


def test_prompt_plus_body_is_the_function_and_no_docstring_leaks(docs):
    assert len(docs) > 200
    for d in docs:
        user, body = (m["content"] for m in d["messages"])
        code = user.split("\n\n", 1)[1]
        tree = ast.parse(code + "\n" + body)  # one function, exactly as written in the module
        (fn,) = tree.body
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        literal = ast.get_source_segment(code, fn.body[0].value)
        assert literal and literal[0] in "\"'rRuU" and literal not in body, d["id"]
        assert body.strip() and not body.startswith("\n") and body == body.rstrip()


def test_decorators_kept_in_prompt(docs):
    item = {d["id"]: d for d in docs}["fractions.py::Fraction.from_float"]
    assert "\n\n@classmethod\ndef from_float(cls, f):\n" in item["messages"][0]["content"]
    props = [d for d in docs if "\n@property\n" in d["messages"][0]["content"]]
    assert props and all("@property" not in d["messages"][1]["content"].splitlines()[0] for d in props)


def test_module_split_disjoint_and_deterministic(docs):
    by_module = {}
    for d in docs:
        by_module.setdefault(d["module"], set()).add(d["split"])
    assert all(len(s) == 1 for s in by_module.values())
    assert min(split_counts(docs).values()) > 0  # the subset spans both splits
    assert python_docstring_conversations(modules=SUBSET) == docs
    assert len({d["id"] for d in docs}) == len(docs)
    # The split is a function of the path alone, and about val_fraction of modules go to val.
    paths = [f"m{i}.py" for i in range(4000)]
    share = sum(module_split(p, 0.05) == "val" for p in paths) / len(paths)
    assert 0.03 < share < 0.07
    everything_val = python_docstring_conversations(val_fraction=0.999999, modules=["bisect.py"])
    assert split_counts(everything_val)["train"] == 0


def test_cap_and_stub_filters():
    src = textwrap.dedent('''
        def stub():
            """Doc."""
            ...
        def notimpl(self):
            """Doc."""
            raise NotImplementedError("subclass")
        def nodoc():
            return 1
        def long():
            """Doc."""
            x = 1
            return x + 1234567890123456789
        class C:
            def method(self):
                """Doc."""
                # keeps comments
                return 2
        def outer():
            """Doc."""
            def inner():
                """Nested: part of outer's body."""
                return 3
            return inner
        ''')
    from stagewise.data.builtin_chat import docstring_conversations
    ids = [d["id"] for d in docstring_conversations(src, "x.py", max_body_chars=200)]
    assert ids == ["x.py::long", "x.py::C.method", "x.py::outer"]
    ids = [d["id"] for d in docstring_conversations(src, "x.py", max_body_chars=35)]
    assert ids == ["x.py::C.method"]
    (m,) = [d for d in docstring_conversations(src, "x.py") if d["qualname"] == "C.method"]
    assert m["messages"][1]["content"] == "    # keeps comments\n    return 2"
    assert docstring_conversations("def broken(:\n", "y.py") == []


def test_dispatch_errors():
    with pytest.raises(DataError, match="valid: python-docstrings, arithmetic"):
        builtin_conversations("nope")
    with pytest.raises(DataError, match="arithmetic"):
        builtin_conversations("arithmetic", bogus=1)
    with pytest.raises(DataError, match="no stdlib module file"):
        python_docstring_conversations(modules=["no_such_module.py"])


# ----------------------------------------------------------------------------- arithmetic

def _reference_value(p: Problem) -> int:
    return {"add": p.a + p.b, "mul": p.a * p.b}[p.op]


def test_generate_deterministic_and_balanced():
    kw = dict(ops=("add", "mul"), digits=(1, 3), seed=7)
    a, b = generate(500, **kw), generate(500, **kw)
    assert a == b and generate(500, ops=("add", "mul"), digits=(1, 3), seed=8) != a
    assert len({(p.op, p.a, p.b) for p in a}) == len(a)  # unique by default
    lengths = [len(str(p.a)) for p in a]
    assert {1, 2, 3} == set(lengths) and min(lengths.count(n) for n in (1, 2, 3)) > 100
    assert {p.op for p in a} == {"add", "mul"}
    # The val set of a seed does not depend on how many train problems were asked for.
    assert arithmetic.conversations(10, 20, seed=3)[10:] == arithmetic.conversations(50, 20, seed=3)[50:]


def test_train_val_disjoint_including_commuted():
    kw = dict(ops=("add", "mul"), digits=(1, 2), fmt="reversed")
    train = generate(3000, "train", seed=0, **kw)
    val = generate(300, "val", seed=1, **kw)
    key = lambda p: (p.op, min(p.a, p.b), max(p.a, p.b))
    assert not {key(p) for p in train} & {key(p) for p in val}
    assert all(p.split(0.1) == "val" for p in val)
    with pytest.raises(DataError, match="distinct val problems"):
        generate(50, "val", digits=(1, 1))  # only ~5 of the 55 one-digit sums are val


@pytest.mark.parametrize("fmt", FORMATS)
def test_targets_match_python_arithmetic(fmt):
    rng = random.Random(fmt)
    for _ in range(400):
        p = Problem(rng.randrange(10 ** rng.randint(1, 5)), rng.randrange(10 ** rng.randint(1, 5)),
                    rng.choice(["add", "mul"]), fmt)
        v = _reference_value(p)
        assert p.prompt == f"{p.a}{'+' if p.op == 'add' else '*'}{p.b}=" and p.value == v
        if fmt == "plain":
            assert p.target == str(v)
        elif fmt == "reversed":
            assert p.target == "".join(reversed(str(v)))
        else:
            _verify_scratchpad(p, v)
        assert check(p.target, p) and extract_answer(p.target, fmt) == v


def _verify_scratchpad(p: Problem, v: int) -> None:
    *steps, last = p.target.split("\n")
    assert last == f"answer: {v}"
    if p.op == "add":
        digits, carry = [], 0
        for i, line in enumerate(steps):
            x, y, c, s, w, c2 = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+), write (\d), carry (\d)", line).groups())
            assert x == p.a // 10 ** i % 10 and y == p.b // 10 ** i % 10 and c == carry
            assert s == x + y + c and w == s % 10 and c2 == s // 10
            digits.append(w)
            carry = c2
        assert carry == 0 and int("".join(map(str, reversed(digits)))) == v
    else:
        total = 0
        assert len(steps) == len(str(p.b))
        for i, line in enumerate(steps):
            a, f, part, t0, part2, t1 = map(int, re.fullmatch(r"(\d+)\*(\d+)=(\d+), (\d+)\+(\d+)=(\d+)", line).groups())
            assert a == p.a and f == (p.b // 10 ** i % 10) * 10 ** i and part == part2 == a * f
            assert t0 == total and t1 == t0 + part
            total = t1
        assert total == v


def test_checker_accepts_right_rejects_wrong():
    p = Problem(128, 367, "add", "plain")
    for good in ["495", "495 ", "495\n", "  495<|assistant_end|>", "495<|end|>\nuser: 1+1=", "495."]:
        assert check(good, p), good
    for bad in ["494", "496", "4950", "0495", "49", "4 95", "", "  ", "<|end|>495", "-495", "abc"]:
        assert not check(bad, p), bad
    r = Problem(100, 200, "add", "reversed")  # 300 reversed keeps its leading zeros: "003"
    assert check("003", r) and extract_answer("003\n", "reversed") == 300
    assert not check("3", r) and not check("300", r) and not check("0030", r)
    s = Problem(99, 1, "add", "scratchpad")
    assert check(s.target + "<|end|>", s) and check("answer: 100", s) and check("ANSWER:100 ", s)
    assert not check(s.target.replace("answer: 100", "answer: 101"), s)
    assert not check(s.target.rsplit("\n", 1)[0], s)  # steps without the answer line
    assert not check("answer: 99\nanswer: 100", s)  # the first answer line is the answer
    assert extract_answer("", "plain") is None and extract_answer("no answer", "scratchpad") is None


def test_scratchpad_final_answer_for_many_random_problems():
    for p in generate(2000, ops=("add", "mul"), digits=(1, 4), fmt="scratchpad", seed=11):
        assert extract_answer(p.target, "scratchpad") == _reference_value(p)


def test_conversation_records():
    convs = arithmetic.conversations(30, 10, ops=("mul",), fmt="reversed", seed=2)
    assert split_counts(convs) == {"train": 30, "val": 10}
    for c in convs:
        p = Problem.from_conversation(c)
        assert c["messages"][0]["content"] == p.prompt and c["messages"][1]["content"] == p.target
        assert c["answer"] == str(p.a * p.b) and check(c["messages"][1]["content"], p)
    assert len({c["id"] for c in convs}) == len(convs)
    assert builtin_conversations("arithmetic", train_count=30, val_count=10, ops=("mul",),
                                 fmt="reversed", seed=2) == convs
    with pytest.raises(DataError, match="unknown format"):
        Problem(1, 2, "add", "hex")
    with pytest.raises(DataError, match="digits"):
        generate(1, digits=(0, 2))
