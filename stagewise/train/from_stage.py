"""`stagewise run RECIPE --from-stage NAME`: re-run a staged recipe from stage NAME's start, reusing an
earlier run's stages before it.

The earlier run (--reuse RUN_DIR; default the newest run directory of the recipe's name) must have
finished the stage before NAME. Every stage before NAME must be what the recipe says now: the same
stage settings and run-wide settings (model, data, seed, batch ...), apart from the fields a resume may
change (runner.SAFE_EDITS). Stage NAME and the stages after it may change anything.

A new run directory gets the earlier run's metrics.jsonl up to the end of the stage before NAME, the
exports of the stages before NAME (RUN_DIR/stages/<name>/) and that stage's final checkpoint (which
a staged run keeps: checkpoint/store.py), and then continues exactly as a run resumed at that boundary
does; the earlier run is not touched. With the recipe unchanged the result equals the earlier run
bitwise (tests/test_lifecycle.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from stagewise import rundir
from stagewise.checkpoint.store import list_checkpoints, read_train_record
from stagewise.config.loader import from_dict, read_yaml
from stagewise.config.schema import RunConfig
from stagewise.errors import CheckpointError, ConfigError
from stagewise.train import stages as plan

# Run-wide sections a stage carries its own resolved copy of: compared per stage, not at the top.
_PER_STAGE = ("stages", "schedule", "optim", "sft", "dpo", "rl", "adapter", "name", "out_dir", "init_from")


@dataclasses.dataclass
class Reuse:
    run_dir: Path        # the earlier run
    index: int           # the stage re-run from
    checkpoint: Path     # the earlier run's final checkpoint of stage index - 1
    step: int


def newest_run(cfg: RunConfig) -> Path | None:
    """out_dir/name, name-2, ... : the highest-numbered that exists."""
    found, path, n = None, Path(cfg.out_dir) / cfg.name, 1
    while path.exists():
        found, n = path, n + 1
        path = path.with_name(f"{cfg.name}-{n}")
    return found


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k2: v2 for k, v in value.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    if isinstance(value, list):
        return {k2: v2 for i, v in enumerate(value) for k2, v2 in _flat(v, f"{prefix}{i}.").items()} or \
            {prefix[:-1]: []}
    return {prefix[:-1]: value}


def _plain(obj) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _first_difference(old: RunConfig, new: RunConfig, j: int) -> str | None:
    from stagewise.train.runner import SAFE_EDITS

    a = {k: v for k, v in _plain(plan.stage_config(old, j)).items() if k not in _PER_STAGE}
    b = {k: v for k, v in _plain(plan.stage_config(new, j)).items() if k not in _PER_STAGE}
    fa = {**_flat(a), **_flat(_plain(old.stages[j]), f"stages[{j}].")}
    fb = {**_flat(b), **_flat(_plain(new.stages[j]), f"stages[{j}].")}
    for k in sorted(fa.keys() | fb.keys()):
        if fa.get(k) != fb.get(k) and not k.startswith(SAFE_EDITS):
            return f"{k} ({fa.get(k)!r} -> {fb.get(k)!r})"
    return None


def plan_reuse(cfg: RunConfig, name: str, reuse: str | None, tokenizer_sha: str, model_config: dict) -> Reuse:
    """Check that the recipe can re-run from stage `name` on the earlier run; one-line errors otherwise."""
    names = [st.name for st in cfg.stages]
    if not cfg.stages:
        raise ConfigError("--from-stage: the recipe has no stages (a plain recipe is one stage: run it again)")
    if name not in names:
        raise ConfigError(f"--from-stage: no stage {name!r} in the recipe (stages: {', '.join(names)})")
    k = names.index(name)
    if k == 0:
        raise ConfigError(f"--from-stage: {name!r} is the first stage; nothing to reuse (run without --from-stage)")
    old_dir = Path(reuse) if reuse else newest_run(cfg)
    if old_dir is None:
        raise ConfigError(f"--from-stage: no earlier run of {cfg.name!r} in {cfg.out_dir}; name one with --reuse RUN_DIR")
    if not (old_dir / rundir.CONFIG).is_file():
        raise CheckpointError(f"--reuse: {old_dir} is not a stagewise run directory (no {rundir.CONFIG})")
    old = from_dict(RunConfig, read_yaml(old_dir / rundir.CONFIG))
    old_names = [st.name for st in old.stages]
    if old_names[:k] != names[:k]:
        raise ConfigError(f"--from-stage: {old_dir}'s stages before {name!r} are {old_names[:k]}, the recipe's "
                          f"{names[:k]}; they must be the same stages")
    for j in range(k):
        if (diff := _first_difference(old, cfg, j)) is not None:
            raise ConfigError(f"--from-stage {name}: stage {names[j]!r} would not be the one {old_dir} ran: {diff}; "
                              f"only stage {name!r} and later may change (or start a new run)")
    if json.loads((old_dir / rundir.MODEL_CONFIG).read_text()) != json.loads(json.dumps(model_config)):
        raise ConfigError(f"--from-stage: the model of {old_dir} differs from the recipe's; they must be the same")
    from stagewise.data import Tokenizer

    if Tokenizer.load(old_dir / rundir.TOKENIZER).sha256 != tokenizer_sha:
        raise ConfigError(f"--from-stage: {old_dir} was trained with another tokenizer than the recipe gives")
    prev = names[k - 1]
    if not (old_dir / plan.STAGES_DIR / prev / "model.safetensors").is_file():
        raise CheckpointError(f"--from-stage: {old_dir} has not finished stage {prev!r} (no {plan.STAGES_DIR}/{prev}/); "
                              f"resume it first (stagewise resume {old_dir})")
    for ckpt in reversed(list_checkpoints(old_dir / rundir.CHECKPOINTS)):
        st = read_train_record(ckpt)["train_state"].get("stage") or {}
        if st.get("index") == k - 1 and st.get("complete"):
            return Reuse(old_dir, k, ckpt, read_train_record(ckpt)["step"])
    raise CheckpointError(f"--from-stage: {old_dir} has no final checkpoint of stage {prev!r} (written before "
                          f"stagewise kept stage ends); re-run it from an earlier stage")


def copy_prior(reuse: Reuse, cfg: RunConfig, run_dir: Path) -> Path:
    """Copy what the stages before reuse.index produced into the new run_dir; returns the checkpoint there.
    A failed copy removes the new run directory: nothing half-written is left."""
    try:
        return _copy(reuse, cfg, run_dir)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _copy(reuse: Reuse, cfg: RunConfig, run_dir: Path) -> Path:
    steps = [r["step"] for r in rundir.read_metrics(reuse.run_dir / rundir.METRICS)]
    lines = (reuse.run_dir / rundir.METRICS).read_text().splitlines(keepends=True)[:len(steps)]
    (run_dir / rundir.METRICS).write_text("".join(line for line, s in zip(lines, steps) if s <= reuse.step))
    for st in cfg.stages[:reuse.index]:
        shutil.copytree(reuse.run_dir / plan.STAGES_DIR / st.name, run_dir / plan.STAGES_DIR / st.name)
    target = run_dir / rundir.CHECKPOINTS / reuse.checkpoint.name
    shutil.copytree(reuse.checkpoint, target)
    plan.write_forgetting(cfg, run_dir, reuse.index, plan.forgetting_domains(cfg))
    return target
