"""Render a `stagewise report` page in headless Chromium and save a screenshot.

    .venv/bin/python scripts/screenshot_report.py                      # synthetic 3-stage example run
    .venv/bin/python scripts/screenshot_report.py runs/NAME --out shot.png
    .venv/bin/python scripts/screenshot_report.py --out docs/img/report-example.png --palette

Without RUN_DIR it writes a synthetic 3-stage continual pre-training run (smooth curves with a
stability gap at each boundary, replay, a forgetting matrix) to a temporary directory, so the
page can be checked before any real multi-stage run exists. Chromium runs with networking off
(`--disable-background-networking`, a fresh profile), so what the screenshot shows is what the
page holds offline. `--palette` quantizes the PNG to 256 colours (Pillow) to keep it small.

Needs Debian's chromium (`apt-get install -y chromium`) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise.report import write_report  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def write_example_run(run_dir: Path, steps_per_stage: int = 400, eval_every: int = 25) -> Path:
    """A plausible 3-stage run: web -> code (20% replay) -> math (20% replay), three validation domains."""
    rng = random.Random(0)
    stages = ["web", "code", "math"]
    domains = ["web", "code", "math"]
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "name: cpt-example\nmodel: {d_model: 256, n_layers: 6}\ntrain: {steps: 1200, batch_size: 16}\n"
        "data: {seq_len: 256}\noptim: {lr: 0.002}\nschedule: {name: cosine}\nprecision: {mode: bf16-mixed}\n")
    (run_dir / "run_info.json").write_text(json.dumps({"device": "cpu", "torch": "2.13.0+cpu",
                                                       "dataset": "(synthetic example)"}))
    floor = {"web": 3.2, "code": 2.4, "math": 2.8}   # loss each domain reaches when trained on
    start = {"web": 7.5, "code": 6.2, "math": 6.8}
    val = dict(start)
    rows, matrix, gap = [], [], []
    tokens_per_step = 16 * 256
    step = 0
    for si, name in enumerate(stages):
        mix = {d: 0.0 for d in domains}
        replay = 0.0 if si == 0 else 0.2
        mix[name] = 1.0 - replay
        for old in stages[:si]:
            mix[old] += replay / si
        boundary = dict(val)
        for k in range(steps_per_stage):
            step += 1
            t = k / steps_per_stage
            warm = min(1.0, (k + 1) / 40)
            lr = 2e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
            for d in domains:   # move toward the domain's floor at a rate set by its share of the data
                share = mix[d] + (0.15 if d != name and d != "web" else 0.0)
                target = floor[d] if share > 0.1 else boundary[d] + 0.6
                val[d] += (target - val[d]) * (0.02 * share + 0.002)
                if si and k < 60 and d != name:  # the stability gap: an early bump on the old domains
                    val[d] += 0.012 * math.exp(-k / 25) * (1 if k < 20 else -0.6)
            counts = [rng.random() for _ in domains]
            realised = {d: mix[d] * (1 + 0.3 * (c - 0.5)) for d, c in zip(domains, counts)}
            norm = sum(realised.values())
            rec = {"step": step, "tokens": step * tokens_per_step, "lr": lr,
                   "loss": sum(mix[d] * val[d] for d in domains) + 0.08 * rng.gauss(0, 1),
                   "step_time_s": 0.4, "stage": si, **{f"mix/{d}": realised[d] / norm for d in domains}}
            if si:  # as the trainer writes it: only in a stage that replays
                rec["replay"] = sum(realised[d] for d in stages[:si]) / norm
            if step % eval_every == 0 or k == steps_per_stage - 1:
                rec.update({f"val_loss/{d}": val[d] + 0.01 * rng.gauss(0, 1) for d in domains})
                rec["val_loss"] = sum(rec[f"val_loss/{d}"] for d in domains) / len(domains)
            rows.append(rec)
        matrix.append([round(val[d], 4) for d in domains])
        if si:
            for d in stages[:si]:
                gap.append({"stage": si, "domain": d, "boundary_step": step - steps_per_stage,
                            "boundary_loss": round(boundary[d], 4), "peak_rise": 0.18, "peak_step":
                            step - steps_per_stage + 20, "recover_steps": 55 if d == "web" else None})
    forgetting = [[None if i < j else round(matrix[i][j] - min(matrix[k][j] for k in range(j, i + 1)), 4)
                   for j in range(len(domains))] for i in range(len(stages))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "forgetting.json").write_text(json.dumps(
        {"domains": domains, "stages": stages, "matrix": matrix, "forgetting": forgetting, "stability_gap": gap}))
    return run_dir


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2400, chromium: str = "chromium") -> Path:
    exe = shutil.which(chromium)
    if exe is None:
        raise SystemExit(f"error: {chromium} not found (Debian: apt-get install -y chromium)")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise SystemExit(f"error: chromium wrote no screenshot to {png}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="run directory (default: a synthetic 3-stage example run)")
    ap.add_argument("--out", default="report-screenshot.png", help="screenshot PNG (default report-screenshot.png)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--palette", action="store_true", help="quantize to 256 colours to shrink the file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else write_example_run(Path(tmp) / "cpt-example")
        index = write_report(run_dir, Path(tmp) / "report")  # never writes into the run directory
        png = screenshot(index, Path(args.out), args.width, args.height)
    if args.palette:
        from PIL import Image

        Image.open(png).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(png, optimize=True)
    print(f"screenshot: {png} ({png.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
