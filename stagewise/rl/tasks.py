"""Prompt tasks with verifiable rewards, for the RL stage.

A task makes problems (a prompt, a reference solution its verifier accepts, the data it needs) and
scores a completion: `reward` is what the policy gradient maximises, `correct` the success that
success rate and exact match count. Built-in tasks and their options (defaults in brackets):

  arithmetic               data/arithmetic.py's problems and checker. ops [add] (add, mul),
                           min_digits [1], max_digits [3], format [plain] (plain, reversed,
                           scratchpad), format_reward [0.0]: the reward of a wrong answer that sits
                           where the format puts one, unique [true]: no problem twice in a split (a
                           small digit range may have too few; set false to allow repeats),
                           val_fraction [0.1]
  countdown                rl/countdown.py's game. numbers [3] given, each 1..max_number [20],
                           ops [+ - * /], use_all [false]: each number at most once (true: exactly
                           once), format_reward [0.0]: the reward of a valid expression over the
                           numbers with the wrong value, unique [true], val_fraction [0.1]
  reasoning-gym:<dataset>  a procedural dataset of the reasoning-gym package; every option but
                           val_fraction [0.1] goes to its config (seed and size are stagewise's)

Train and val are disjoint for every built-in, by a hash of the problem (the operands, the sorted
numbers and target, the question text), never by seed. reasoning-gym has no split of its own, and a
split of it may repeat a question (its generators can, in small problem spaces). A completion is
judged as the assistant reply it is: arithmetic reads its answer and ignores what follows, countdown
reads the first non-blank line, reasoning-gym scores the whole reply, stripped.

User code registers a task through the Python API (register_task, register_reward) and a recipe
names it: a recipe never holds code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

from stagewise.data import arithmetic
from stagewise.errors import ConfigError, DataError
from stagewise.rl import countdown
from stagewise.rl.countdown import parse_expression

RG_PREFIX = "reasoning-gym:"
TASKS = ("arithmetic", "countdown", RG_PREFIX + "<dataset>")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TaskProblem:
    prompt: str    # the user turn, as plain text
    solution: str  # a reference assistant reply the verifier accepts (a demonstration for SFT)
    key: str       # stable id, "<task>/<seed>/<split>/<i>"
    data: dict     # what the verifier needs; JSON-serialisable


@runtime_checkable
class Task(Protocol):
    name: str

    def problems(self, split: str, count: int, seed: int) -> list[TaskProblem]: ...
    def reward(self, problem: TaskProblem, completion: str) -> float: ...
    def correct(self, problem: TaskProblem, completion: str) -> bool: ...


class ArithmeticTask:
    name = "arithmetic"
    DEFAULTS = {"ops": ("add",), "min_digits": 1, "max_digits": 3, "format": "plain",
                "format_reward": 0.0, "unique": True, "val_fraction": 0.1}

    def __init__(self, options: Optional[dict] = None):
        o = _options(self.name, options, self.DEFAULTS)
        self.ops, self.digits, self.fmt = o["ops"], (o["min_digits"], o["max_digits"]), o["format"]
        self.format_reward, self.unique, self.val_fraction = o["format_reward"], o["unique"], o["val_fraction"]
        try:  # validates every option without drawing a problem
            arithmetic.generate(0, "train", self.ops, self.digits, self.fmt, 0, self.val_fraction)
        except DataError as e:
            raise ConfigError(f"rl.task {e}") from None

    def problems(self, split: str, count: int, seed: int) -> list[TaskProblem]:
        drawn = arithmetic.generate(count, split, self.ops, self.digits, self.fmt, seed, self.val_fraction, self.unique)
        return [TaskProblem(p.prompt, p.target, f"arithmetic/{self.fmt}/{seed}/{split}/{i}", asdict(p))
                for i, p in enumerate(drawn)]

    def reward(self, problem: TaskProblem, completion: str) -> float:
        p = arithmetic.Problem(**problem.data)
        if arithmetic.check(completion, p):
            return 1.0
        return self.format_reward if arithmetic.extract_answer(completion, p.fmt) is not None else 0.0

    def correct(self, problem: TaskProblem, completion: str) -> bool:
        return arithmetic.check(completion, arithmetic.Problem(**problem.data))


class CountdownTask:
    name = "countdown"
    DEFAULTS = {"numbers": 3, "max_number": 20, "ops": countdown.OPS, "use_all": False,
                "format_reward": 0.0, "unique": True, "val_fraction": 0.1}

    def __init__(self, options: Optional[dict] = None):
        o = _options(self.name, options, self.DEFAULTS)
        self.numbers, self.max_number, self.ops = o["numbers"], o["max_number"], o["ops"]
        self.use_all, self.format_reward = o["use_all"], o["format_reward"]
        self.unique, self.val_fraction = o["unique"], o["val_fraction"]
        if not 1 <= self.numbers <= countdown.MAX_DEPTH or self.max_number < 1:
            raise ConfigError(f"rl.task countdown: numbers must be 1..{countdown.MAX_DEPTH} and max_number >= 1, "
                              f"got {self.numbers} and {self.max_number}")
        if not self.ops or len(set(self.ops)) != len(self.ops) or not set(self.ops) <= set(countdown.OPS):
            raise ConfigError(f"rl.task countdown: ops {list(self.ops)} invalid; choose distinct ops from {' '.join(countdown.OPS)}")
        _check_fraction(self.name, self.val_fraction)

    def problems(self, split: str, count: int, seed: int) -> list[TaskProblem]:
        _check_request(self.name, split, count)
        try:
            drawn = countdown.generate(count, split, seed, self.numbers, self.max_number, self.ops,
                                       self.use_all, self.val_fraction, self.unique)
        except ValueError as e:
            raise DataError(f"rl.task countdown: {e}") from None
        return [TaskProblem(countdown.prompt(p.numbers, p.target, self.ops, self.use_all), p.solution,
                            f"countdown/{seed}/{split}/{i}", {"numbers": list(p.numbers), "target": p.target})
                for i, p in enumerate(drawn)]

    def _value(self, problem: TaskProblem, completion: str):
        return parse_expression(countdown.answer_line(completion), problem.data["numbers"], self.ops, self.use_all)

    def reward(self, problem: TaskProblem, completion: str) -> float:
        value = self._value(problem, completion)
        if value is None:
            return 0.0
        return 1.0 if value == problem.data["target"] else self.format_reward

    def correct(self, problem: TaskProblem, completion: str) -> bool:
        return self._value(problem, completion) == problem.data["target"]


class ReasoningGymTask:
    """reasoning-gym entries come from one stream per seed (item i of a dataset is drawn from
    Random(dataset_seed + i), so stagewise's seed is hashed to a 32-bit dataset seed: seeds 0 and 1
    would otherwise share all but one item); each entry goes to train or val by a hash of its question.
    A val draw scans ~1/val_fraction entries per problem, which matters only for slow generators."""

    def __init__(self, dataset: str, options: Optional[dict] = None):
        self.name, self.dataset = RG_PREFIX + dataset, dataset
        try:
            import reasoning_gym
        except ImportError:
            raise ConfigError(f"rl.task {self.name} needs the reasoning-gym package: pip install reasoning-gym") from None
        self._rg = reasoning_gym
        known = sorted(reasoning_gym.factory.DATASETS)
        if dataset not in known:
            some = difflib.get_close_matches(dataset, known, n=5, cutoff=0.5) or known[:5]
            raise ConfigError(f"rl.task {self.name}: unknown reasoning-gym dataset {dataset!r}; valid include "
                              f"{', '.join(some)} ({len(known)} in all: reasoning_gym.factory.DATASETS)")
        options = dict(_mapping(self.name, options))
        for reserved in ("seed", "size"):
            if reserved in options:
                raise ConfigError(f"rl.task {self.name}: option {reserved} is set by stagewise per split; remove it")
        self.val_fraction = _typed(self.name, "val_fraction", options.pop("val_fraction", 0.1), 0.1)
        _check_fraction(self.name, self.val_fraction)
        self.options = options
        self._datasets: dict = {}  # (dataset seed, size) -> reasoning-gym dataset
        self._entries: dict = {}   # (dataset seed, size, index) -> the entry as generated, for scoring
        self._source(0, 8)         # bad options fail here, when the task is built

    def _source(self, seed: int, size: int):
        if (seed, size) not in self._datasets:
            try:
                self._datasets[seed, size] = self._rg.create_dataset(self.dataset, seed=seed, size=size, **self.options)
            except (TypeError, ValueError, AssertionError) as e:
                first = (str(e) or type(e).__name__).splitlines()[0]
                raise ConfigError(f"rl.task {self.name}: reasoning-gym refused options {self.options}: {first}") from None
        return self._datasets[seed, size]

    def problems(self, split: str, count: int, seed: int) -> list[TaskProblem]:
        _check_request(self.name, split, count)
        share = self.val_fraction if split == "val" else 1.0 - self.val_fraction
        # Some generators (acre, list_functions) draw per-item state for the whole size up front, so
        # size is part of what an index means: it is fixed per request and kept in the problem.
        size = int(3 * count / share) + 100
        rg_seed = _hash_int(f"reasoning-gym/{self.dataset}/{seed}") >> 32
        source, out = self._source(rg_seed, size), []
        for index in range(size):
            if len(out) == count:
                break
            entry = source[index]
            if self._split(entry["question"]) != split:
                continue
            if entry["answer"] is None:
                raise DataError(f"rl.task {self.name}: the dataset has no reference answers (answer is None); "
                                f"a task needs one per problem as its solution, choose another dataset")
            self._entries[rg_seed, size, index] = entry
            data = {"rg_seed": rg_seed, "rg_size": size, "rg_index": index, "question": entry["question"],
                    "answer": str(entry["answer"]), "metadata": _jsonable(entry.get("metadata", {}))}
            out.append(TaskProblem(entry["question"], str(entry["answer"]), f"{self.name}/{seed}/{split}/{len(out)}", data))
        if len(out) < count:
            raise DataError(f"rl.task {self.name}: found only {len(out)} {split} problems in {size} entries, "
                            f"{count} requested; lower the count or widen the dataset's options")
        return out

    def _split(self, question: str) -> str:
        return "val" if _hash_int(f"reasoning-gym/{self.dataset}/{question}") / 2.0**64 < self.val_fraction else "train"

    def score(self, problem: TaskProblem, completion: str) -> float:
        """score_answer on the entry as generated: data's metadata went through JSON (tuples became
        lists), which some scorers (arc_agi) then judge differently."""
        d = problem.data
        where = (d["rg_seed"], d["rg_size"], d["rg_index"])
        source = self._source(d["rg_seed"], d["rg_size"])
        if where not in self._entries:  # e.g. a problem restored from a checkpoint: regenerate it
            self._entries[where] = source[d["rg_index"]]
        entry = self._entries[where]
        if entry["question"] != d["question"]:
            raise DataError(f"rl.task {self.name}: problem {problem.key} was not made with these options {self.options}")
        try:
            return float(source.score_answer(answer=completion.strip(), entry=entry))
        except Exception:  # third-party scorers can trip on arbitrary model text; that earns nothing
            return 0.0

    def reward(self, problem: TaskProblem, completion: str) -> float:
        return self.score(problem, completion)

    def correct(self, problem: TaskProblem, completion: str) -> bool:
        return self.score(problem, completion) == 1.0


class UserRewardTask:
    """A built-in task's problems and success, with a user function as the reward."""

    def __init__(self, name: str, fn: Callable, base: Task):
        self.name, self.fn, self.base = name, fn, base

    def problems(self, split: str, count: int, seed: int) -> list[TaskProblem]:
        return self.base.problems(split, count, seed)

    def reward(self, problem: TaskProblem, completion: str) -> float:
        value = self.fn(problem, completion)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DataError(f"rl.task {self.name}: the reward function returned {value!r}; expected a finite float")
        return float(value)

    def correct(self, problem: TaskProblem, completion: str) -> bool:
        return self.base.correct(problem, completion)


# name -> a Task object (register_task) or (fn, problems_from, options) (register_reward)
_REGISTERED: dict = {}


def register_task(name: str, task: Task) -> None:
    """Make `task` buildable by name, so a recipe can name it. Registering a name again replaces it."""
    _check_new_name(name)
    if not isinstance(task, Task):
        raise ConfigError(f"register_task {name!r}: {type(task).__name__} is not a Task; it needs name, problems, reward and correct")
    _REGISTERED[name] = task


def register_reward(name: str, fn: Callable, problems_from: str = "arithmetic", options: Optional[dict] = None) -> None:
    """Task `name`: the problems and success of `problems_from` (built with `options`), rewarded by
    fn(problem, completion) -> float. Options a recipe gives for `name` override `options`."""
    _check_new_name(name)
    if not callable(fn):
        raise ConfigError(f"register_reward {name!r}: the reward must be callable as fn(problem, completion), got {type(fn).__name__}")
    build_task(problems_from, options)  # an unknown base or bad options fail now, not at training time
    _REGISTERED[name] = (fn, problems_from, dict(options or {}))


def build_task(name: str, options: Optional[dict] = None) -> Task:
    if not isinstance(name, str):
        raise ConfigError(f"rl.task: the task must be a name, got {type(name).__name__}")
    options = _mapping(name, options)
    if name in _REGISTERED:
        entry = _REGISTERED[name]
        if not isinstance(entry, tuple):
            if options:
                raise ConfigError(f"rl.task {name}: a task given to register_task takes no options, got {sorted(options)}")
            return entry
        fn, problems_from, base_options = entry
        return UserRewardTask(name, fn, build_task(problems_from, {**base_options, **options}))
    if name == "arithmetic":
        return ArithmeticTask(options)
    if name == "countdown":
        return CountdownTask(options)
    if name.startswith(RG_PREFIX):
        return ReasoningGymTask(name[len(RG_PREFIX):], options)
    registered = ", ".join(sorted(_REGISTERED)) or "none"
    raise ConfigError(f"rl.task: unknown task {name!r}; valid: arithmetic, countdown, reasoning-gym:<name>, "
                      f"or a name given to register_task (registered: {registered})")


def _check_new_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register: a task name must be a non-empty string, got {name!r}")
    if name in TASKS[:2] or name.startswith(RG_PREFIX):
        raise ConfigError(f"register: {name!r} is a built-in task name ({', '.join(TASKS)}); choose another")


def _mapping(task: str, options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"rl.task {task}: options must be a mapping, got {type(options).__name__}")
    return options


def _options(task: str, given, defaults: dict) -> dict:
    given = _mapping(task, given)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"rl.task {task}: unknown option {unknown[0]!r}; valid: {', '.join(defaults)}")
    return {key: _typed(task, key, given[key], default) if key in given else default
            for key, default in defaults.items()}


def _typed(task: str, key: str, value, default):
    """`value` as the type of `default`: a list (of strings) for a tuple, a number for a float."""
    if isinstance(default, tuple):
        ok, want = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of strings"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = type(value) is type(default), {bool: "true or false", int: "an integer", str: "a string"}[type(default)]
    if not ok:
        raise ConfigError(f"rl.task {task}: option {key} must be {want}, got {value!r}")
    return tuple(value) if isinstance(default, tuple) else float(value) if isinstance(default, float) else value


def _check_fraction(task: str, fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"rl.task {task}: val_fraction must be in (0, 1), got {fraction}")


def _check_request(task: str, split: str, count: int) -> None:
    if split not in SPLITS:
        raise DataError(f"rl.task {task}: split must be 'train' or 'val', got {split!r}")
    if count < 0:
        raise DataError(f"rl.task {task}: count must be >= 0, got {count}")


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _jsonable(value):
    """Tuples become lists and anything JSON cannot hold its str(): data is for logs and rollouts."""
    try:
        return json.loads(json.dumps(value, default=str))
    except ValueError:  # a circular reference
        return None
