"""Shared plumbing of the experiments: run `stagewise run` for every configuration and seed, keep a
compact machine-readable record of each run, and render tables and plots from that record alone.

Every run is a real CLI run; nothing is simulated. An experiment script defines its runs and two
pure functions of its record — `table(record) -> str` (Markdown) and `plot(record, path)` — so that
`python tables.py` regenerates every table and figure from `results/*.json` without training, and
the test suite checks that the committed tables are exactly what the records give.

Seeds and the noise rule (experiments/README.md): every configuration runs with SEEDS (the seed
sets model initialisation and data order, so runs of one seed differ only in what the experiment
varies); a cell is `mean ± std` over seeds (sample std, n - 1); a difference is taken seed by seed
and called an effect only when every seed's difference has the same sign and their mean exceeds
twice their std across seeds, otherwise it is reported as noise.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))  # in-process imports use the same stagewise as the runs (cwd=REPO)
from stagewise import rundir  # noqa: E402
SEEDS = tuple(int(s) for s in os.environ.get("EXPERIMENT_SEEDS", "1,2,3").split(","))
WORKERS = int(os.environ.get("EXPERIMENT_JOBS", "2"))  # runs at a time, one thread each
NOISE_FACTOR = 2.0


@dataclass
class Spec:
    """One configuration: a table label, a run-directory name and its `stagewise run` overrides."""
    label: str
    name: str
    overrides: tuple[str, ...]
    base: str = "base.yaml"


def _train(experiment: str, spec: Spec, seed: int) -> dict:
    out = Path(os.environ.get("EXPERIMENT_RUNS", HERE / "runs")) / experiment
    name = f"{spec.name}-s{seed}"
    shutil.rmtree(out / name, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "stagewise", "run", str(HERE / spec.base), f"--name={name}", f"--out_dir={out}",
           f"--data.cache_dir={HERE / '.cache'}", f"--seed={seed}", *spec.overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    recs = rundir.read_metrics(out / name / rundir.METRICS)
    print(f"  {name}: {wall:.0f}s, final loss {recs[-1]['loss']:.4f}", flush=True)
    return {"label": spec.label, "name": spec.name, "seed": seed, "wall_s": round(wall, 1), "dir": out / name,
            "metrics": recs}


def run_all(experiment: str, specs: list[Spec], seeds=SEEDS) -> dict[str, list[dict]]:
    """Train every (spec, seed), WORKERS at a time; {label: [run per seed, in seed order]}."""
    jobs = [(s, seed) for s in specs for seed in seeds]
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda job: _train(experiment, *job), jobs))
    out: dict[str, list[dict]] = {s.label: [] for s in specs}
    for r in done:
        out[r["label"]].append(r)
    return out


def run_dir(experiment: str, name: str, seed: int) -> Path:
    return HERE / "runs" / experiment / f"{name}-s{seed}"


# ------------------------------------------------------------------ records

def curve(recs: list[dict], key: str, every: int = 1) -> list[list[float]]:
    """[[step, value], ...] of the metrics lines that carry `key` (every `every`-th such line)."""
    pts = [[r["step"], r[key]] for r in recs if key in r and isinstance(r[key], (int, float))]
    return [p for i, p in enumerate(pts) if i % every == 0 or i == len(pts) - 1]


def last(recs: list[dict], key: str) -> float:
    return [r[key] for r in recs if key in r][-1]


def save_record(experiment: str, title: str, settings: dict, runs: dict[str, list[dict]], summarise,
                extra: dict | None = None) -> dict:
    """Write results/<experiment>.json: per run its final numbers (`summarise(run) -> (final, curves)`)
    and the machine it ran on; returns the record (what `table` and `plot` take)."""
    out_runs = []
    for label, per_seed in runs.items():
        for r in per_seed:
            final, curves = summarise(r)
            out_runs.append({"label": label, "seed": r["seed"], "wall_s": r["wall_s"], "final": final,
                             "curves": curves})
    record = {"experiment": experiment, "title": title, "date": datetime.date.today().isoformat(),
              "machine": machine(), "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
              "workers": WORKERS, "settings": settings,
              "labels": list(runs), "runs": out_runs, **(extra or {})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{experiment}.json"
    path.write_text(json.dumps(record, indent=1, default=_refuse) + "\n")
    return json.loads(path.read_text())


def _refuse(x):
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def load_record(experiment: str) -> dict:
    return json.loads((RESULTS / f"{experiment}.json").read_text())


def by_label(record: dict, key: str) -> dict[str, list[float]]:
    """{label: [final[key] per seed, in seed order]} in the record's label order."""
    out = {label: [] for label in record["labels"]}
    for r in sorted(record["runs"], key=lambda r: r["seed"]):
        out[r["label"]].append(r["final"].get(key))
    return out


# ------------------------------------------------------------------ statistics and cells

def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    return m, s


def paired(values: list[float], reference: list[float]) -> list[float]:
    """Per-seed differences: the same seed gives both runs the same initialisation and data order."""
    return [v - r for v, r in zip(values, reference) if v is not None and r is not None]


def is_effect(values: list[float], reference: list[float]) -> bool:
    """The noise rule: every seed's difference has the same sign, and their mean exceeds
    NOISE_FACTOR x their std across seeds."""
    d = paired(values, reference)
    m, s = mean_std(d)
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    return len(d) >= 2 and same_sign and abs(m) > NOISE_FACTOR * s


def cell(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def delta_cell(values: list[float], reference: list[float], digits: int = 3) -> str:
    """`+0.103 ± 0.004 (effect)`: the mean per-seed difference, its std across seeds, and what
    the noise rule calls it."""
    if values is reference:
        return "—"
    m, s = mean_std(paired(values, reference))
    return f"{m:+.{digits}f} ± {s:.{digits}f} ({'effect' if is_effect(values, reference) else 'noise'})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(record: dict) -> str:
    m = record["machine"]
    walls = [r["wall_s"] for r in record["runs"]]
    return (f"Seeds {', '.join(map(str, record['seeds']))}; cells are mean ± std over seeds; Δ is the mean ± std of "
            f"the per-seed differences, an effect only when all seeds agree in sign and |mean| > {NOISE_FACTOR:g}× std "
            f"(experiments/README.md). Measured "
            f"{record['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, {record['workers']} runs "
            f"at a time with one thread each; {len(walls)} runs, {min(walls):.0f}–{max(walls):.0f} s each, "
            f"{sum(walls) / 60:.1f} min of run time in all. Raw numbers: [{record['experiment']}.json]"
            f"({record['experiment']}.json).")


# ------------------------------------------------------------------ output

def write_outputs(module) -> None:
    """results/<EXP>.md and .png from the module's record, via its table() and plot()."""
    record = load_record(module.EXP)
    path = RESULTS / f"{module.EXP}.md"
    path.write_text(module.table(record))
    print(path.read_text())
    module.plot(record, RESULTS / f"{module.EXP}.png")


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2))
    return fig, (axes if panels > 1 else [axes])


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def band(ax, record: dict, label: str, key: str, color: str, linestyle: str = "-", name: str | None = None) -> None:
    """Mean over seeds of a curve, with a min-max band: what one seed would not show."""
    runs = [r["curves"][key] for r in record["runs"] if r["label"] == label and key in r["curves"]]
    if not runs:
        return
    steps = [s for s, _ in runs[0]]
    n = min(len(c) for c in runs)
    vals = [[c[i][1] for c in runs] for i in range(n)]
    ax.plot(steps[:n], [sum(v) / len(v) for v in vals], color=color, linestyle=linestyle, label=name or label)
    if len(runs) > 1:
        ax.fill_between(steps[:n], [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.15,
                        linewidth=0)


def smooth(points: list[list[float]], k: int = 10) -> list[list[float]]:
    out, acc = [], []
    for s, v in points:
        acc = (acc + [v])[-k:]
        out.append([s, sum(acc) / len(acc)])
    return out
