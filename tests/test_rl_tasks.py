"""RL prompt tasks: built-in problems are solved by their own solutions, verifiers refuse what they
must (the Countdown verifier is fed hostile text), splits are disjoint, the registry resolves names."""

import ast
import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from stagewise.errors import ConfigError, DataError
from stagewise.rl import countdown, tasks
from stagewise.rl.tasks import TaskProblem, build_task, parse_expression, register_reward, register_task


# --- arithmetic ---------------------------------------------------------------------------------

def test_arithmetic_reward_and_correct():
    task = build_task("arithmetic", {"format_reward": 0.1, "max_digits": 2})
    p = task.problems("train", 20, seed=0)[0]
    value = p.data["a"] + p.data["b"]
    assert p.prompt == f"{p.data['a']}+{p.data['b']}=" and p.solution == str(value)
    assert task.reward(p, f"{value}<|end|> junk") == 1.0 and task.correct(p, f"{value}\n")
    assert task.reward(p, str(value + 1)) == 0.1 and not task.correct(p, str(value + 1))
    assert task.reward(p, "no idea") == 0.0
    assert build_task("arithmetic").reward(p, str(value + 1)) == 0.0  # format_reward defaults to 0


def test_arithmetic_reversed_and_scratchpad():
    rev = build_task("arithmetic", {"format": "reversed", "min_digits": 3})
    p = rev.problems("val", 5, seed=1)[0]
    value = str(p.data["a"] + p.data["b"])
    assert rev.correct(p, value[::-1]) and rev.reward(p, p.solution) == 1.0
    assert value != value[::-1] and not rev.correct(p, value)  # the plain order is wrong here
    pad = build_task("arithmetic", {"format": "scratchpad", "ops": ["mul"]})
    q = pad.problems("train", 5, seed=0)[0]
    assert pad.reward(q, q.solution) == 1.0 and q.solution.endswith(f"answer: {q.data['a'] * q.data['b']}")


def test_arithmetic_splits_unique_and_options():
    task = build_task("arithmetic", {"max_digits": 2})
    train = {(p.data["a"], p.data["b"]) for p in task.problems("train", 500, seed=0)}
    val = {(p.data["a"], p.data["b"]) for p in task.problems("val", 50, seed=3)}
    assert not train & val and not {(b, a) for a, b in train} & val
    assert task.problems("val", 50, seed=3) == task.problems("val", 50, seed=3)
    with pytest.raises(DataError, match="unique"):
        build_task("arithmetic", {"max_digits": 1}).problems("train", 200, seed=0)
    assert len(build_task("arithmetic", {"max_digits": 1, "unique": False}).problems("train", 200, seed=0)) == 200
    for bad, words in (({"ops": ["pow"]}, "ops"), ({"format": "roman"}, "format"), ({"digits": 3}, "unknown option"),
                       ({"max_digits": "3"}, "integer"), ({"min_digits": 3, "max_digits": 2}, "digits")):
        with pytest.raises(ConfigError, match=words):
            build_task("arithmetic", bad)


# --- countdown ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"use_all": True, "numbers": 4}, {"ops": ["+", "*"], "max_number": 9}])
def test_countdown_problems_solved_by_their_solution(options):
    task = build_task("countdown", options)
    problems = task.problems("train", 200, seed=0)
    assert len({p.key for p in problems}) == 200
    for p in problems:
        assert task.reward(p, p.solution) == 1.0 and task.correct(p, p.solution)
        assert isinstance(p.data["target"], int) and p.data["target"] > 0
        assert p.prompt.startswith(f"Using the numbers {', '.join(map(str, p.data['numbers']))}, ")
        assert f"make {p.data['target']}." in p.prompt
        json.dumps(p.data)
    for p in problems:
        # An independent reference: Python's own parser and Fraction arithmetic on our generator's
        # output (trusted text, its characters checked first); the verifier itself never evaluates text.
        assert set(p.solution) <= set("0123456789()" + "".join(task.ops)), p.solution
        assert eval(re.sub(r"\d+", r"Fraction(\g<0>)", p.solution), {"Fraction": Fraction}) == p.data["target"]
        used, given = Counter(map(int, re.findall(r"\d+", p.solution))), Counter(p.data["numbers"])
        assert (used == given) if task.use_all else (used <= given and len(used) > 0)


def test_countdown_deterministic_and_disjoint():
    task = build_task("countdown")
    assert task.problems("train", 100, seed=5) == task.problems("train", 100, seed=5)
    assert task.problems("train", 100, seed=5) != task.problems("train", 100, seed=6)
    assert task.problems("val", 30, seed=0) == task.problems("val", 30, seed=0)

    def puzzles(split, seed, count):
        return {(tuple(sorted(p.data["numbers"])), p.data["target"]) for p in task.problems(split, count, seed)}
    train = puzzles("train", 0, 2000) | puzzles("train", 1, 2000)
    val = puzzles("val", 0, 300) | puzzles("val", 7, 300)
    assert len(val) > 500 and not train & val


def test_countdown_prompt_text():
    prompt = countdown.prompt
    assert prompt([3, 7, 2], 20, ("+", "-", "*", "/"), False) == (
        "Using the numbers 3, 7, 2, each at most once, with + - * / and parentheses, make 20. "
        "Reply with the expression only.")
    assert "each exactly once" in prompt([3, 7, 2], 20, ("+",), True)
    p = TaskProblem("", "", "k", {"numbers": [3, 7, 2], "target": 20})
    assert build_task("countdown").reward(p, "(3+7)*2") == 1.0


REFUSED = [
    "x+1", "__import__('os').system('x')", "abs(3)", "(3).real", "2**3", "3**2", "-3+5", "+3", "1.5*2",
    "3e1", "0x3", "3_0", "True+2", "'3'+'7'", "\"20\"", "lambda: 20", "[3 for _ in (7,)]", "{3, 7}", "(3, 7)",
    "3 if 7 else 2", "3<7", "3//2", "3%7", "3&7", "~3", "[3][0]", "3+", "", "   ", "3+7)", "5+7", "3+3",
    "7+3+2+3", "3/(7-7)", "+".join(["3"] * 80), "３+７",
]


@pytest.mark.parametrize("text", REFUSED)
def test_countdown_verifier_refuses(text):
    assert parse_expression(text, [3, 7, 2, 7], use_all=False) is None
    task = build_task("countdown", {"format_reward": 0.5})
    p = TaskProblem("", "", "k", {"numbers": [3, 7, 2, 7], "target": 10})
    assert task.reward(p, text) == 0.0 and not task.correct(p, text)


def test_countdown_whitelist_alone_refuses():
    """The AST walk refuses on its own what the character filter before it already keeps out."""
    for text in ("x+1", "abs(3)", "(3).real", "True+2", "1.5*2", "'3'", "lambda: 3", "[3 for _ in ()]", "3<7", "-3"):
        assert countdown._to_tree(ast.parse(text, mode="eval").body, set(countdown.OPS), 1) is None, text
    assert countdown._to_tree(ast.parse("(3+7)*2", mode="eval").body, set(countdown.OPS), 1) == ("*", ("+", 3, 7), 2)


def test_countdown_verifier_accepts():
    numbers = [3, 7, 2]
    assert parse_expression("3 + 7", numbers) == 10
    assert parse_expression("(3+7)*2 = 20", numbers) == 20
    assert parse_expression(" ( 3 + 7 ) * 2=20 ", numbers) == 20
    assert parse_expression("7/2*2", numbers + [2]) == 7  # exact: no float rounding
    assert parse_expression("7/2", numbers) == Fraction(7, 2)
    assert parse_expression("7", numbers) == 7
    assert parse_expression("7-7", [7, 7]) == 0
    assert parse_expression("3+7", numbers, ops=("*",)) is None  # + not among the allowed ops
    task = build_task("countdown", {"format_reward": 0.25})
    p = TaskProblem("", "", "k", {"numbers": numbers, "target": 20})
    assert task.reward(p, "\n(3+7)*2 = 20\nbecause 10 times 2<|end|>") == 1.0
    assert task.reward(p, "3*7-2+1") == 0.0  # 1 is not given: refused, no format reward
    assert task.reward(p, "3*7-2") == 0.25 and not task.correct(p, "3*7-2")
    assert task.reward(p, "1000 + " * 30 + "3") == 0.0  # too long


def test_countdown_length_and_depth_limits():
    assert parse_expression("(" * 99 + "3" + ")" * 99, [3]) == 3  # 199 characters; redundant parentheses add no depth
    assert parse_expression("(" * 100 + "3" + ")" * 100, [3]) is None  # 201
    ones = [1] * 40
    assert parse_expression("+".join(["1"] * 32), ones) == 32  # a left-leaning chain: 32 levels
    assert parse_expression("+".join(["1"] * 33), ones) is None
    assert parse_expression("(1+" * 31 + "1" + ")" * 31, ones) == 32
    assert parse_expression("(1+" * 32 + "1" + ")" * 32, ones) is None
    with pytest.raises(ConfigError, match="numbers"):
        build_task("countdown", {"numbers": 33})


def test_countdown_use_all():
    assert parse_expression("3+7", [3, 7, 2], use_all=True) is None
    assert parse_expression("(3+7)*2", [3, 7, 2], use_all=True) == 20
    assert parse_expression("(3+7)*2*2", [3, 7, 2], use_all=True) is None
    task = build_task("countdown", {"use_all": True})
    p = task.problems("val", 1, seed=0)[0]
    assert "each exactly once" in p.prompt
    assert sorted(int(t) for t in p.solution.replace("(", " ").replace(")", " ").translate(
        str.maketrans("+-*/", "    ")).split()) == sorted(p.data["numbers"])


def test_countdown_bad_options():
    for bad, words in (({"ops": ["^"]}, "ops"), ({"numbers": 0}, "numbers"), ({"use_all": "yes"}, "true or false"),
                       ({"val_fraction": 1.5}, "val_fraction"), ({"target": 3}, "unknown option 'target'")):
        with pytest.raises(ConfigError, match=words):
            build_task("countdown", bad)
    with pytest.raises(DataError, match="found only"):
        build_task("countdown", {"numbers": 2, "max_number": 2}).problems("train", 100, seed=0)
    with pytest.raises(DataError, match="split"):
        build_task("countdown").problems("test", 1, seed=0)


# --- reasoning-gym ------------------------------------------------------------------------------

def test_reasoning_gym_chain_sum():
    task = build_task("reasoning-gym:chain_sum", {"min_terms": 2, "max_terms": 3, "max_digits": 2})
    train, val = task.problems("train", 300, seed=0), task.problems("val", 40, seed=0)
    assert len(train) == 300 and len(val) == 40
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert task.problems("val", 40, seed=0) == val and task.problems("val", 40, seed=1) != val
    for p in train[:50] + val:
        json.dumps(p.data)
        assert task.reward(p, p.solution) == 1.0 and task.correct(p, p.solution)
        wrong = str(int(p.solution) + 1)
        assert task.reward(p, wrong) < 1.0 and not task.correct(p, wrong)
    # A fresh task (e.g. after a restart) regenerates the entry from the problem's data.
    assert build_task("reasoning-gym:chain_sum", {"min_terms": 2, "max_terms": 3, "max_digits": 2}).reward(
        val[0], f"  {val[0].solution}\n") == 1.0


def test_reasoning_gym_errors():
    with pytest.raises(ConfigError, match="unknown reasoning-gym dataset 'chainsum'.*chain_sum"):
        build_task("reasoning-gym:chainsum")
    with pytest.raises(ConfigError, match="refused options"):
        build_task("reasoning-gym:chain_sum", {"bogus": 1})
    with pytest.raises(ConfigError, match="option seed is set by stagewise"):
        build_task("reasoning-gym:chain_sum", {"seed": 1})
    with pytest.raises(DataError, match="no reference answers"):
        build_task("reasoning-gym:graph_color").problems("train", 2, seed=0)


# --- registry -----------------------------------------------------------------------------------

def test_register_reward_calls_user_function(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTERED", {})
    calls = []

    def shortness(problem, completion):
        calls.append((problem.key, completion))
        return 1.0 / (1 + len(completion))
    register_reward("short", shortness, problems_from="arithmetic", options={"max_digits": 2})
    task = build_task("short", {"format": "reversed"})
    p = task.problems("train", 3, seed=0)[0]
    assert p.data["fmt"] == "reversed" and p.data["a"] < 100
    assert task.reward(p, "abc") == 0.25 and calls == [(p.key, "abc")]
    assert task.correct(p, p.solution) and not task.correct(p, "x")  # success stays arithmetic's
    register_reward("bad", lambda problem, completion: "high")
    with pytest.raises(DataError, match="finite float"):
        build_task("bad").reward(p, "1")


def test_register_task_and_names(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTERED", {})

    class Echo:
        name = "echo"

        def problems(self, split, count, seed):
            return [TaskProblem("say hi", "hi", f"echo/{seed}/{split}/{i}", {}) for i in range(count)]

        def reward(self, problem, completion):
            return float(completion.strip() == "hi")

        def correct(self, problem, completion):
            return completion.strip() == "hi"
    echo = Echo()
    register_task("echo", echo)
    assert build_task("echo") is echo
    with pytest.raises(ConfigError, match="takes no options"):
        build_task("echo", {"x": 1})
    for builtin in ("arithmetic", "countdown", "reasoning-gym:chain_sum"):
        with pytest.raises(ConfigError, match="built-in"):
            register_task(builtin, echo)
    with pytest.raises(ConfigError, match="not a Task"):
        register_task("nothing", object())
    with pytest.raises(ConfigError) as err:
        build_task("foo")
    assert str(err.value) == ("rl.task: unknown task 'foo'; valid: arithmetic, countdown, reasoning-gym:<name>, "
                              "or a name given to register_task (registered: echo)")
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        register_reward("r", lambda p, c: 1.0, problems_from="nope")
