"""A recipe's stages: how many, of which kind, with which schedule, mixture and budget.

A plain recipe is one stage (its `kind`, its train.steps, its data); a recipe with `stages:`
runs them in order in one run directory (docs/continual.md). Every stage after the first
starts from the previous stage's final checkpoint, loaded from disk, also in an uninterrupted
run: a run resumed at a stage boundary then does exactly what the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from stagewise import rundir
from stagewise.config.loader import read_yaml
from stagewise.config.schema import RunConfig
from stagewise.eval.forgetting import forgetting_report

FORGETTING = rundir.FORGETTING
STAGES_DIR = "stages"


def is_staged(run_dir: str | Path) -> bool:
    cfg_file = Path(run_dir) / rundir.CONFIG
    return cfg_file.is_file() and bool(read_yaml(cfg_file).get("stages"))


def n_stages(cfg: RunConfig) -> int:
    return len(cfg.stages) or 1


def stage_kind(cfg: RunConfig, index: int) -> str:
    return cfg.stages[index].kind if cfg.stages else cfg.kind


def stage_name(cfg: RunConfig, index: int) -> str:
    return cfg.stages[index].name if cfg.stages else cfg.name


def stage_section(cfg: RunConfig, index: int, kind: str):
    """The sft, dpo or rl section stage `index` trains with (a plain recipe's own section)."""
    return getattr(cfg.stages[index] if cfg.stages else cfg, kind)


def domain_sources(cfg: RunConfig) -> dict:
    """name -> SourceConfig of every pre-training domain, in order of first appearance."""
    out = {}
    for st in cfg.stages:
        for d in st.mixture:
            out.setdefault(d.name, d.source)
    return out


def forgetting_domains(cfg: RunConfig) -> list[str]:
    """The columns of forgetting.json: every pre-training domain, then every sft and dpo stage's own data
    (a dpo column is its validation preference loss)."""
    return list(domain_sources(cfg)) + [s.name for s in cfg.stages if s.kind in ("sft", "dpo")]


def verifiable(cfg: RunConfig, index: int) -> bool:
    """Whether stage `index` has validation problems a checker scores (exact_match): an rl stage with
    eval_problems, an sft or dpo stage with built-in arithmetic data and eval_generate."""
    kind = stage_kind(cfg, index)
    if kind == "rl":
        return stage_section(cfg, index, "rl").eval_problems > 0
    if kind in ("sft", "dpo"):
        section = stage_section(cfg, index, kind)
        return section.eval_generate > 0 and any(src.kind == "arithmetic" for src in section.data)
    return False


def forgetting_columns(cfg: RunConfig) -> list[dict]:
    """The columns of forgetting.json's `table`, in the order stages introduce them: {"key": the metrics.jsonl
    key, "stage": the index of the stage that introduces it, "higher_is_better"}. Bits per byte of every
    pre-training domain and of every sft stage's validation conversations; exact_match of every verifiable
    stage. Every stage from `stage` on evaluates the column (train/carried.py)."""
    cols, seen = [], set()
    for i, st in enumerate(cfg.stages):
        for d in st.mixture:
            if d.name not in seen:
                seen.add(d.name)
                cols.append({"key": f"val_bpb/{d.name}", "stage": i, "higher_is_better": False})
        if st.kind == "sft":
            cols.append({"key": f"val_bpb/{st.name}", "stage": i, "higher_is_better": False})
        if verifiable(cfg, i):
            cols.append({"key": f"exact_match/{st.name}", "stage": i, "higher_is_better": True})
    return cols


def seen_domains(cfg: RunConfig, index: int) -> list[str]:
    """The pre-training domains of stages 0..index, in order of first appearance."""
    return [n for n in domain_sources(cfg) if any(d.name == n for s in cfg.stages[:index + 1] for d in s.mixture)]


def mixture_probs(cfg: RunConfig, index: int) -> dict[str, float]:
    """Per-sequence probability of each domain in stage `index`: its weight share of 1 - replay, and
    replay split evenly over the domains earlier stages trained on that this stage does not."""
    st = cfg.stages[index]
    total = sum(d.weight for d in st.mixture)
    probs = {d.name: (1 - st.replay) * d.weight / total for d in st.mixture if d.weight > 0}
    earlier = [n for n in domain_sources(cfg) if n not in {d.name for d in st.mixture}
               and any(d.name == n and d.weight > 0 for s in cfg.stages[:index] for d in s.mixture)]
    for n in earlier:
        probs[n] = st.replay / len(earlier) if st.replay > 0 else 0.0
    return {n: p for n, p in probs.items() if p > 0}


def stage_steps(cfg: RunConfig, index: int) -> int:
    if not cfg.stages:
        return cfg.train.steps
    st = cfg.stages[index]
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    return st.steps if st.steps is not None else math.ceil(st.tokens / per_step)


def stage_config(cfg: RunConfig, index: int) -> RunConfig:
    """The recipe as the loop sees it during stage `index`."""
    if not cfg.stages:
        return cfg
    st = cfg.stages[index]
    precision = dataclasses.replace(cfg.precision, mode=st.precision or cfg.precision.mode, schedule=[])
    return dataclasses.replace(cfg, schedule=st.schedule, optim=st.optim, precision=precision, adapter=st.adapter,
                               init_from=st.init_from if index == 0 else None)


def base_source(cfg: RunConfig, run_dir: Path, index: int):
    """The weights stage `index` starts from, as a path load_init_source reads: its init_from, else the
    previous stage's export (RUN_DIR/stages/<name>/); None for a first stage trained from scratch."""
    own = cfg.stages[index].init_from if cfg.stages else cfg.init_from
    if own is not None or index == 0:
        return own
    return Path(run_dir) / STAGES_DIR / cfg.stages[index - 1].name


def common_fields(cfg: RunConfig, index: int, start: int, run_dir: Path) -> dict:
    """The Stage fields every kind sets the same way: name, budget, start, what it begins from, and
    the cooldown of an infinite schedule (a staged recipe's may be triggered by RUN_DIR/COOLDOWN)."""
    if not cfg.stages:  # a plain recipe: train.steps; its schedule's own cooldown_at_step
        return {"index": 0, "name": cfg.name, "start": start, "budget": cfg.train.steps,
                "base": base_source(cfg, run_dir, 0)}
    st = cfg.stages[index]
    infinite = st.schedule.name == "infinite"
    init_from = st.init_from if index > 0 else None
    return {"index": index, "name": st.name, "start": start, "budget": stage_steps(cfg, index),
            "init_from": init_from, "keep_optimizer": st.optimizer_state == "keep" and not init_from,
            "cooldown_at": st.schedule.cooldown_at_step if infinite else None, "triggerable": infinite,
            "report_index": True, "base": base_source(cfg, run_dir, index)}


def write_forgetting(cfg: RunConfig, run_dir: Path, completed: int, domains: list[str]) -> dict:
    report = forgetting_report(rundir.read_metrics(run_dir / rundir.METRICS), [s.name for s in cfg.stages[:completed]],
                               domains, forgetting_columns(cfg))
    rundir.write_json(run_dir / FORGETTING, report)
    return report
