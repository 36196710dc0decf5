"""Memory-efficient training on the benchmark model: each optimizer's state bytes, peak memory, speed and
loss against AdamW, and what activation checkpointing saves and costs.

Every configuration is a real `stagewise run` (a child process each, one at a time, so that its peak
RSS is its own) of the benchmark model (bench/throughput.py's reference shape: d_model 384, 6 layers,
6 heads, ffn 1024, vocab 8192) on the CPython standard library, bf16-mixed, for the same steps and
tokens. Read back from the run directory:

  optimizer bytes   memory.json's measured optimizer states (torch's MemTracker on the probe step;
                    stagewise/memory/measure.py), as a share of AdamW's
  tracked peak      the highest total of tracked tensors during the probe step
  peak RSS          the run process's VmHWM (interpreter, data and all)
  tokens/s          median over the timed steps (the first 3 and the probe step left out)
  val loss          validation loss after the last step (equal tokens for every configuration)

    python bench/memory.py                 # ~9 min on 2 cores
    python bench/memory.py --steps 20      # quicker, noisier

Results are appended to bench/results/memory.jsonl (machine, date, raw numbers) and the table is
printed (bench/README.md quotes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory.jsonl"
RECIPE = """
name: bench-memory
seed: 1
threads: 2
model: {{d_model: 384, n_layers: 6, n_heads: 6, ffn_dim: 1024, max_seq_len: 512, tie_embeddings: false}}
data:
  sources: [{{kind: python-stdlib}}]
  tokenizer: {{vocab_size: 8192}}
  cache_dir: {cache}
  seq_len: {seq}
  val_fraction: 0.02
train: {{steps: {steps}, batch_size: {batch}}}
optim: {{lr: 1.0e-3}}
schedule: {{name: cosine, warmup_steps: {warmup}}}
precision: {{mode: bf16-mixed}}
eval: {{every: 0, batches: 8}}
checkpoint: {{every: 0, keep_last: 1}}
log: {{progress: none}}
sample: {{prompts: []}}
"""

OPTIMIZERS = [("adamw", []), ("adamw-8bit", []), ("adamw-4bit", []), ("galore", []), ("galore-8bit", []),
              ("fira", []), ("apollo", []), ("apollo-mini", []), ("muon", [])]
CHECKPOINTING = [("none", []), ("selective", ["--train.activation_checkpointing=selective"]),
                 ("full", ["--train.activation_checkpointing=full"]),
                 ("full every 2", ["--train.activation_checkpointing=full", "--train.checkpoint_every=2"])]


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s+(.+)", lscpu)
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    return {"cpu": name.group(1).strip() if name else platform.processor(), "cores": os.cpu_count(),
            "flags_of_note": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "load_avg_at_start": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version()}


def run(recipe: Path, out: Path, name: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "stagewise", "run", str(recipe), f"--name={name}", f"--out_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_dir = out / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    memory = next(iter(json.loads((run_dir / "memory.json").read_text()).values()))
    timed = [r["tokens_per_s"] for r in records[3:] if r["step"] != memory["measured"]["at_step"]]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    m = memory["measured"]
    return {"name": name, "overrides": overrides, "tokens_per_s": statistics.median(timed),
            "val_loss": val[-1] if val else None, "optimizer_bytes": m["optimizer"], "tracked_peak": m["peak"],
            "activations": m["activations"], "peak_rss": m["process"],
            "predicted": {k: memory["predicted"][k] for k in ("optimizer", "activations", "peak", "process")}}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(rec: dict) -> str:
    lines = []
    base = rec["optimizers"][0]
    lines += ["| optimizer | optimizer states | vs AdamW | tracked peak | peak RSS | tokens/s vs AdamW | val loss |",
              "|---|---|---|---|---|---|---|"]
    for r in rec["optimizers"]:
        lines.append(f"| {r['name']} | {mib(r['optimizer_bytes'])} | {r['optimizer_bytes'] / base['optimizer_bytes']:.1%}"
                     f" | {mib(r['tracked_peak'])} | {mib(r['peak_rss'])} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x ({r['tokens_per_s']:,.0f}) | "
                     f"{r['val_loss']:.3f} |")
    base = rec["checkpointing"][0]
    lines += ["", "| activation checkpointing (AdamW) | activations | tracked peak | peak RSS | tokens/s vs none |",
              "|---|---|---|---|---|"]
    for r in rec["checkpointing"]:
        lines.append(f"| {r['label']} | {mib(r['activations'])} ({r['activations'] / base['activations']:.0%}) | "
                     f"{mib(r['tracked_peak'])} ({r['tracked_peak'] / base['tracked_peak']:.0%}) | "
                     f"{mib(r['peak_rss'])} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--cache", default=str(ROOT / "bench" / ".cache"))
    args = p.parse_args()
    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "steps": args.steps, "batch": args.batch, "seq": args.seq, "optimizers": [], "checkpointing": []}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "bench.yaml"
        recipe.write_text(RECIPE.format(cache=args.cache, seq=args.seq, steps=args.steps, batch=args.batch,
                                        warmup=max(1, args.steps // 10)))
        out = Path(tmp) / "runs"
        for name, extra in OPTIMIZERS:
            r = run(recipe, out, name, [f"--optim.name={name}", "--optim.update_proj_gap=20", *extra])
            rec["optimizers"].append(r)
            print(f"{name:12} states {mib(r['optimizer_bytes']):>12}  peak RSS {mib(r['peak_rss']):>12}  "
                  f"{r['tokens_per_s']:8.0f} tokens/s  val {r['val_loss']:.3f}", flush=True)
        for label, extra in CHECKPOINTING:
            r = run(recipe, out, "ac-" + label.replace(" ", "-"), extra)
            r["label"] = label
            rec["checkpointing"].append(r)
            print(f"checkpointing {label:13} activations {mib(r['activations']):>12}  peak RSS "
                  f"{mib(r['peak_rss']):>12}  {r['tokens_per_s']:8.0f} tokens/s", flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(table(rec))


if __name__ == "__main__":
    main()
