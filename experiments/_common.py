"""Shared plumbing of the experiments: run `stagewise run` with overrides, read metrics, write
a Markdown table and a PNG. Every run is a real CLI run; nothing is simulated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def run(experiment: str, name: str, *overrides: str, base: str = "base.yaml") -> list[dict]:
    """Train one configuration; returns its metrics.jsonl records."""
    out = HERE / "runs" / experiment
    done = out / name / "final" / "model.safetensors"
    if os.environ.get("EXPERIMENT_REUSE") and done.exists():  # re-tabulate / re-plot finished runs only
        return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / name, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "stagewise", "run", str(HERE / base), f"--name={name}",
           f"--out_dir={out}", f"--data.cache_dir={HERE / '.cache'}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    print(f"  {name}: {time.perf_counter() - t0:.0f}s, final loss {recs[-1]['loss']:.4f}, "
          f"val {recs[-1].get('val_loss', float('nan')):.4f}", flush=True)
    return recs


def final_val(recs: list[dict]) -> float:
    return [r["val_loss"] for r in recs if "val_loss" in r][-1]


def smooth(values: list[float], k: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def write_table(experiment: str, title: str, header: list[str], rows: list[list], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    path = RESULTS / f"{experiment}.md"
    path.write_text("\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else ""))
    print(path.read_text())
    return path


def figure(experiment: str, panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2))
    return fig, (axes if panels > 1 else [axes]), lambda: _save(fig, experiment)


def _save(fig, experiment: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{experiment}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path
