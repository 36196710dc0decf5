"""Per-step losses of two recipes, for checking that a change to the training loop changes nothing.

Runs (1) recipes/quickstart.yaml for its first 100 of 900 steps (the run is stopped by the test
hook STAGEWISE_DEBUG_KILL_AT_STEP, so the LR schedule is the 900-step one) and (2) a two-stage
continual recipe (python-stdlib, then shakespeare with 5% replay and a re-warmed WSD schedule),
and writes {step, loss, val_loss...} per step to OUT/<name>.jsonl. Records of two code versions
are compared bitwise with --compare A B.

    python bench/loop_identity.py --out bench/results/loop_identity/after
    python bench/loop_identity.py --compare bench/results/loop_identity/before bench/results/loop_identity/after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stagewise import rundir

ROOT = Path(__file__).resolve().parent.parent

TWO_STAGE = """
name: two-stage
seed: 7
model: {d_model: 64, n_layers: 2, n_heads: 2, max_seq_len: 128}
data: {tokenizer: {vocab_size: 1024, train_bytes: 2000000}, seq_len: 64}
train: {batch_size: 8}
optim: {lr: 3.0e-3}
schedule: {name: cosine, warmup_steps: 10}
precision: {mode: bf16-mixed}
eval: {every: 20, batches: 2}
checkpoint: {every: 30, keep_last: 2}
log: {progress: none}
stages:
  - name: code
    steps: 40
    mixture: [{name: python, source: {kind: python-stdlib}}]
  - name: plays
    steps: 30
    replay: 0.05
    optim: {lr: 2.0e-3}
    schedule: {name: wsd, warmup_steps: 5, decay_fraction: 0.3}
    mixture: [{name: shakespeare, source: {kind: shakespeare}}]
"""

KEYS = ("step", "loss", "grad_norm", "lr", "val_loss", "stage")


def run(recipe: Path, out_dir: Path, extra_env: dict, overrides: list[str]) -> list[dict]:
    env = {**os.environ, **extra_env}
    cmd = [sys.executable, "-m", "stagewise", "run", str(recipe), f"--out_dir={out_dir}", "--log.progress=none",
           *overrides]
    subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)  # the kill hook exits with -9
    (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
    rows = rundir.read_metrics(run_dir / rundir.METRICS)
    return [{k: r[k] for k in KEYS if k in r} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="directory for quickstart.jsonl and two-stage.jsonl")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        same = True
        for name in ("quickstart.jsonl", "two-stage.jsonl"):
            a, b = ((d / name).read_text().splitlines() for d in args.compare)
            diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            ok = len(a) == len(b) and not diff
            same &= ok
            print(f"{name}: {len(a)} vs {len(b)} steps, {'bitwise identical' if ok else f'differ at {diff[:5]}'}")
        raise SystemExit(0 if same else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "two.yaml").write_text(TWO_STAGE)
        (tmp / "q").mkdir()
        (tmp / "c").mkdir()
        jobs = {"quickstart": (ROOT / "recipes/quickstart.yaml", tmp / "q", {"STAGEWISE_DEBUG_KILL_AT_STEP": "100"}),
                "two-stage": (tmp / "two.yaml", tmp / "c", {})}
        for name, (recipe, out_dir, env) in jobs.items():
            rows = run(recipe, out_dir, env, [f"--data.cache_dir={ROOT / 'data_cache'}"])
            (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{name}: {len(rows)} steps, last loss {rows[-1]['loss']:.6f}")


if __name__ == "__main__":
    main()
