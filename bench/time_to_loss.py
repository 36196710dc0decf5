"""Time to a target validation loss: tokens, steps and seconds a recipe needs to reach it.

Trains a recipe (default: the quickstart) through the real CLI, `stagewise run`, with frequent
evaluation, then reads the run's metrics.jsonl and reports, for each target, the first eval step
whose val_loss <= target: the step, the tokens seen, and the training seconds up to it (the sum
of step_time_s, which times forward, backward and the optimizer step only: evaluation,
checkpointing, data preparation and start-up are excluded; the whole run's wall time is recorded
separately). An existing run directory can be analysed without training (--run-dir).

    python bench/time_to_loss.py                                   # quickstart, targets 4.0 and 3.5
    python bench/time_to_loss.py --set threads=1 --set train.steps=300 --set optim.lr=6e-3
    python bench/time_to_loss.py --run-dir runs/quickstart --targets 4.5 4.0
    python bench/time_to_loss.py --markdown                        # the results so far, as a table

Compare recipes by tokens (or steps) to target: they do not depend on the machine or its load;
seconds do. Each run appends one JSON line to bench/results/time_to_loss.jsonl (date, machine,
threads, torch, recipe, overrides, results). A target the run never reaches is reported with the
best val_loss it did reach, and the script exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from stagewise import rundir
from stagewise.errors import StagewiseError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "time_to_loss.jsonl"
DEFAULT_RECIPE = ROOT / "recipes" / "quickstart.yaml"
DEFAULT_TARGETS = (4.0, 3.5)


class TimeToLossError(Exception):
    """A user-facing failure, printed as one line."""


@dataclass(frozen=True)
class Crossing:
    target: float
    step: int
    tokens: int
    val_loss: float
    train_s: float  # sum of step_time_s up to and including `step`; evaluation excluded


def read_metrics(path: Path) -> list[dict]:
    """The run's per-step records, read as the product reads them (stagewise.rundir.read_metrics)."""
    if not path.is_file():
        raise TimeToLossError(f"no metrics: {path} does not exist (is it a stagewise run directory?)")
    try:
        records = rundir.read_metrics(path)
    except StagewiseError as e:
        raise TimeToLossError(str(e)) from None
    if not records:
        raise TimeToLossError(f"no metrics: {path} holds no step records")
    return records


def eval_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("val_loss") is not None]


def best_val(records: list[dict]) -> tuple[float, int]:
    """(lowest finite val_loss, its step); raises when the run never evaluated."""
    evals = [r for r in eval_points(records) if math.isfinite(r["val_loss"])]
    if not evals:
        raise TimeToLossError("no finite val_loss in metrics.jsonl: set eval.every so the run evaluates")
    best = min(evals, key=lambda r: r["val_loss"])
    return best["val_loss"], best["step"]


def time_to_target(records: list[dict], target: float) -> Crossing:
    """The first eval step whose val_loss <= target. Raises TimeToLossError naming the best reached."""
    train_s = 0.0
    for r in records:
        train_s += r.get("step_time_s", 0.0)
        v = r.get("val_loss")
        if v is not None and math.isfinite(v) and v <= target:
            return Crossing(target, r["step"], r["tokens"], v, train_s)
    best, step = best_val(records)
    raise TimeToLossError(f"val_loss never reached {target:g}: best {best:.4f} at step {step} "
                          f"of {records[-1]['step']}")


def summarize(records: list[dict], targets: list[float]) -> dict:
    """Crossings (or the failure) for every target, plus the run's end state and stability signs."""
    best, best_step = best_val(records)
    last_eval = eval_points(records)[-1]
    losses = [r["loss"] for r in records if "loss" in r]
    out = {"targets": [], "final_step": records[-1]["step"], "final_tokens": records[-1]["tokens"],
           "final_val_loss": last_eval["val_loss"], "final_val_step": last_eval["step"], "best_val_loss": best, "best_val_step": best_step,
           "train_s": sum(r.get("step_time_s", 0.0) for r in records),
           "nonfinite_losses": sum(not math.isfinite(x) for x in losses),
           "skipped_steps": sum(bool(r.get("skipped")) for r in records),
           "eval_every_tokens": _eval_spacing(records)}
    for t in targets:
        try:
            c = time_to_target(records, t)
            out["targets"].append({"target": t, "reached": True, "step": c.step, "tokens": c.tokens,
                                   "val_loss": c.val_loss, "train_s": round(c.train_s, 2)})
        except TimeToLossError as e:
            out["targets"].append({"target": t, "reached": False, "error": str(e)})
    return out


def _eval_spacing(records: list[dict]) -> int | None:
    """Tokens between the first two evaluations: the resolution of every tokens-to-target figure."""
    ev = eval_points(records)
    return ev[1]["tokens"] - ev[0]["tokens"] if len(ev) > 1 else None


def train(recipe: Path, overrides: list[str], out: Path) -> tuple[Path, float]:
    """Run `stagewise run` in a fresh directory under `out`; (run directory, wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    before = {p for p in out.iterdir() if p.is_dir()}
    cli = Path(sys.executable).with_name("stagewise")
    cmd = [str(cli) if cli.exists() else "stagewise", "run", str(recipe), f"--out_dir={out}"]
    cmd += [f"--{o}" for o in overrides]
    print("$ " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise TimeToLossError(f"stagewise run exited with {rc} (its output is above)")
    new = sorted({p for p in out.iterdir() if p.is_dir()} - before)
    if len(new) != 1:
        raise TimeToLossError(f"expected one new run directory under {out}, found {len(new)}")
    return new[0], wall


def machine() -> str:
    import torch

    from stagewise.train.metrics import _device_name

    return _device_name(torch.device("cpu"))


def hyperparameters(run_dir: Path) -> dict:
    """The settings a time-to-loss comparison varies, from the run's resolved config."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except OSError:
        return {}
    t, s = cfg.get("train", {}), cfg.get("schedule", {})
    return {"lr": cfg.get("optim", {}).get("lr"), "warmup_steps": s.get("warmup_steps"),
            "schedule": s.get("name"), "batch_size": t.get("batch_size"), "grad_accum": t.get("grad_accum"),
            "seq_len": cfg.get("data", {}).get("seq_len"), "steps": t.get("steps"),
            "eval_every": cfg.get("eval", {}).get("every"), "precision": cfg.get("precision", {}).get("mode"),
            "init_std": cfg.get("model", {}).get("init_std")}


def print_table(s: dict) -> None:
    print(f"{'target':>7} {'step':>6} {'tokens':>11} {'train s':>9}")
    for t in s["targets"]:
        if t["reached"]:
            print(f"{t['target']:>7g} {t['step']:>6} {t['tokens']:>11,} {t['train_s']:>9.1f}")
        else:
            print(f"{t['target']:>7g}  not reached ({t['error'].split(': ', 1)[1]})")
    print(f"last val_loss {s['final_val_loss']:.4f} at step {s['final_val_step']}; {s['final_step']} steps, "
          f"{s['final_tokens']:,} tokens, {s['train_s']:.1f} s of training (evaluation excluded); "
          f"evaluations every {s['eval_every_tokens']} tokens")


def markdown(rows: list[dict], targets: list[float]) -> str:
    """The recorded runs as one Markdown table: tokens / steps / training seconds to each target."""
    head = ["lr", "warmup", "batch", "steps"] + [f"to {t:g}: tokens / steps / s" for t in targets]
    head += ["last val_loss", "threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        h, s = r.get("hyperparameters", {}), r["result"]
        cells = [f"{h.get('lr', '?'):g}", str(h.get("warmup_steps")), str(h.get("batch_size")), str(h.get("steps"))]
        by_t = {t["target"]: t for t in s["targets"]}
        for t in targets:
            c = by_t.get(t)
            cells.append("-" if c is None else f"{c['tokens']:,} / {c['step']} / {c['train_s']:.0f}" if c["reached"]
                         else "not reached")
        cells += [f"{s['final_val_loss']:.3f}", str(r.get("threads"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    ap.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to stagewise run as --KEY=VALUE (repeatable)")
    ap.add_argument("--eval-every", type=int, default=25,
                    help="eval.every for the run (ignored with --set eval.every=...): the resolution "
                         "of steps-to-target; each evaluation costs eval.batches forward passes")
    ap.add_argument("--out", type=Path, help="parent of the run directory (default: a new temporary directory)")
    ap.add_argument("--run-dir", type=Path, help="analyse this existing run instead of training")
    ap.add_argument("--note", default="", help="free text stored with the record")
    ap.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--markdown", action="store_true", help="print the recorded results as a Markdown table and exit")
    a = ap.parse_args(argv)
    try:
        if a.markdown:
            rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()] if RESULTS.exists() else []
            print(markdown(rows, a.targets))
            return 0
        wall = None
        overrides = list(a.overrides)
        if a.run_dir:
            run_dir, recipe = a.run_dir, None
        else:
            if not a.recipe.is_file():
                raise TimeToLossError(f"recipe not found: {a.recipe}")
            if not any(o.startswith("eval.every=") for o in overrides):
                overrides.append(f"eval.every={a.eval_every}")
            out = a.out or Path(tempfile.mkdtemp(prefix="time_to_loss-"))
            run_dir, wall = train(a.recipe, overrides, out)
            recipe = str(a.recipe.resolve().relative_to(ROOT)) if a.recipe.resolve().is_relative_to(ROOT) else str(a.recipe)
        s = summarize(read_metrics(run_dir / rundir.METRICS), a.targets)
        info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
        record = {"date": datetime.date.today().isoformat(), "machine": machine(),
                  "threads": info.get("threads"), "torch": info.get("torch"), "device": info.get("device"),
                  "recipe": recipe, "overrides": overrides if recipe else None, "run_dir": str(run_dir),
                  "hyperparameters": hyperparameters(run_dir), "run_wall_s": round(wall, 1) if wall else None,
                  "seconds_note": "train_s sums step_time_s (forward+backward+optimizer; eval excluded)",
                  "note": a.note, "result": s}
        print(f"run: {run_dir}")
        print_table(s)
        if not a.no_record:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(record) + "\n")
        missed = [t for t in s["targets"] if not t["reached"]]
        if missed:
            raise TimeToLossError(missed[0]["error"])
    except TimeToLossError as e:
        print(f"time_to_loss: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
