"""Everything a report shows, read from a run directory without torch or matplotlib.

Reads config.yaml, run_info.json, metrics.jsonl, memory.json (the memory plan and its measurement)
and (multi-stage runs) forgetting.json.
Each is optional except metrics.jsonl; the stage, mixture and forgetting parts are empty
for a single-stage run. A file that exists but cannot be trusted is a one-line error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stagewise.errors import CheckpointError
from stagewise.rundir import CONFIG, FORGETTING, MEMORY, METRICS, RUN_INFO, read_metrics

VAL_PREFIX, BPB_PREFIX, MIX_PREFIX = "val_loss/", "val_bpb/", "mix/"
REPLAY_KEYS = ("replay", "replay_frac")  # the trainer writes `replay` (data/mixture.py)


@dataclass
class Stage:
    index: int
    name: str
    first_step: int
    last_step: int


@dataclass
class Forgetting:
    domains: list[str]
    stages: list[str]
    matrix: list[list[float | None]]      # L[i][j]: loss on domain j after stage i
    forgetting: list[list[float | None]] | None
    stability_gap: list[dict]
    table: dict | None = None   # {"columns", "values", "forgetting"}: every stage's domains and tasks (eval/forgetting.py)


@dataclass
class RunData:
    run_dir: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    run_info: dict = field(default_factory=dict)
    forgetting: Forgetting | None = None
    memory: dict = field(default_factory=dict)       # stage name -> memory.json record
    notes: list[str] = field(default_factory=list)   # files that were absent or skipped

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records that carry a finite `key`."""
        pts = [(r["step"], r[key]) for r in self.records if _finite(r.get(key))]
        return [s for s, _ in pts], [float(v) for _, v in pts]

    def keys_with(self, prefix: str) -> list[str]:
        """Domain names of the keys `prefix<domain>`, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r:
                if k.startswith(prefix):
                    seen.setdefault(k[len(prefix):])
        return list(seen)

    @property
    def stages(self) -> list[Stage]:
        """Contiguous runs of the `stage` key; empty for a single-stage run."""
        out: list[Stage] = []
        for r in self.records:
            if "stage" not in r:
                continue
            idx = int(r["stage"])
            if out and out[-1].index == idx:
                out[-1].last_step = r["step"]
            else:
                out.append(Stage(idx, str(r.get("stage_name") or self._stage_name(idx)), r["step"], r["step"]))
        return out

    def _stage_name(self, idx: int) -> str:
        if self.forgetting and 0 <= idx < len(self.forgetting.stages):
            return self.forgetting.stages[idx]
        cfg_stages = self.config.get("stages")
        if isinstance(cfg_stages, list) and 0 <= idx < len(cfg_stages) and isinstance(cfg_stages[idx], dict) \
                and cfg_stages[idx].get("name"):
            return str(cfg_stages[idx]["name"])
        return f"stage {idx}"

    @property
    def replay_key(self) -> str | None:
        """`replay` as the trainer writes it, or `replay_frac`; None if neither."""
        for key in REPLAY_KEYS:
            if any(_finite(r.get(key)) for r in self.records):
                return key
        return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _matrix(path: Path, data: dict, key: str, rows: int, cols: int) -> list[list[float | None]]:
    m = data.get(key)
    if not (isinstance(m, list) and len(m) == rows and all(isinstance(r, list) and len(r) == cols for r in m)):
        raise CheckpointError(f"{path}: '{key}' must be a {rows} x {cols} list of lists (stages x domains)")
    if not all(v is None or _finite(v) for r in m for v in r):
        raise CheckpointError(f"{path}: '{key}' entries must be numbers or null")
    return [[None if v is None else float(v) for v in r] for r in m]


def read_forgetting(path: Path) -> Forgetting:
    data = _read_json(path)
    domains, stages = data.get("domains"), data.get("stages")
    if not (isinstance(domains, list) and isinstance(stages, list) and domains and stages):
        raise CheckpointError(f"{path}: expected non-empty 'domains' and 'stages' lists")
    matrix = _matrix(path, data, "matrix", len(stages), len(domains))
    forg = _matrix(path, data, "forgetting", len(stages), len(domains)) if data.get("forgetting") is not None else None
    gap = data.get("stability_gap") or []
    if not (isinstance(gap, list) and all(isinstance(g, dict) for g in gap)):
        raise CheckpointError(f"{path}: 'stability_gap' must be a list of objects")
    table = data.get("table")
    if table is not None:
        cols = table.get("columns") if isinstance(table, dict) else None
        if not (isinstance(cols, list) and cols and all(isinstance(c, dict) and isinstance(c.get("key"), str)
                                                        for c in cols)):
            raise CheckpointError(f"{path}: 'table' needs a non-empty 'columns' list of objects with a 'key'")
        table = {"columns": cols, "values": _matrix(path, table, "values", len(stages), len(cols)),
                 "forgetting": _matrix(path, table, "forgetting", len(stages), len(cols))}
    return Forgetting([str(d) for d in domains], [str(s) for s in stages], matrix, forg, gap, table)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not (run_dir / METRICS).is_file():
        raise CheckpointError(f"{run_dir}: not a stagewise run directory (no {METRICS})")
    records = read_metrics(run_dir / METRICS)
    if not records:
        raise CheckpointError(f"{run_dir / METRICS}: no steps logged yet")
    run = RunData(run_dir, records)
    if (run_dir / CONFIG).is_file():
        try:
            cfg = yaml.safe_load((run_dir / CONFIG).read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{run_dir / CONFIG}: not valid YAML ({str(e).splitlines()[0]})") from None
        run.config = cfg if isinstance(cfg, dict) else {}
    else:
        run.notes.append(f"no {CONFIG}: configuration not shown")
    if (run_dir / RUN_INFO).is_file():
        run.run_info = _read_json(run_dir / RUN_INFO)
    if (run_dir / FORGETTING).is_file():
        run.forgetting = read_forgetting(run_dir / FORGETTING)
    if (run_dir / MEMORY).is_file():
        run.memory = read_memory(run_dir / MEMORY)
    return run


def read_memory(path: Path) -> dict:
    """stage name -> {"settings", "predicted", "measured"?}; the numbers are byte counts."""
    data = _read_json(path)
    for stage, rec in data.items():
        ok = isinstance(rec, dict) and isinstance(rec.get("predicted"), dict) and \
            all(_finite(v) for part in ("predicted", "measured") for v in (rec.get(part) or {}).values())
        if not ok:
            raise CheckpointError(f"{path}: stage {stage!r} needs a 'predicted' object of numbers (and optionally "
                                  "'measured')")
    return data
