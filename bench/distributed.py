"""Distributed training on this CPU: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads,
for DDP and FSDP2, and how long the step loop waits for a checkpoint, synchronous or async.

Every configuration is a real run (a child process, or a torchrun job of 2) of one model on the
CPython standard library, fp32, for the same steps and global batches. Read back:

  tokens/s      median over the steps after the first 3 (global tokens: both ranks together)
  peak RSS      metrics.jsonl's peak_mem_bytes of the last step: rank 0's VmHWM (the ranks are
                symmetric), interpreter, data and all
  state held    weights + gradients + AdamW states rank 0 holds after its 2nd step, counted from its
                tensors (memory.json measured_rank; one process: the plan's exact prediction)
  loss          the last step's training loss (the same global batches, so it should agree)

The checkpoint part builds the same model with AdamW in this process, takes one step (so that the
moments exist) and times save_checkpoint (the loop's wait when checkpoint.async_save is false)
against begin_checkpoint(background=True) (its wait when true) and the background write's total.

    python bench/distributed.py              # ~6 min on 2 cores
    python bench/distributed.py --steps 10   # quicker, noisier

Results are appended to bench/results/distributed.jsonl (machine, date, raw numbers) and the table
is printed (bench/README.md quotes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import machine  # noqa: E402  (bench/memory.py)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distributed.jsonl"
MODEL = {"d_model": 512, "n_layers": 8, "n_heads": 8, "ffn_dim": 1408, "max_seq_len": 256, "tie_embeddings": False}
RECIPE = """
name: bench-distributed
seed: 1
threads: {threads}
model: {model}
data:
  sources: [{{kind: python-stdlib}}]
  tokenizer: {{vocab_size: 8192}}
  cache_dir: {cache}
  seq_len: 256
  val_fraction: 0.02
train: {{steps: {steps}, batch_size: 8}}
optim: {{lr: 1.0e-3}}
schedule: {{name: cosine, warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 0, batches: 1}}
checkpoint: {{every: 0, keep_last: 1}}
memory: {{probe: false}}
log: {{progress: none}}
sample: {{prompts: []}}
"""
CONFIGS = [("1 process x 2 threads", 2, None), ("DDP 2 ranks x 1 thread", 1, "ddp"),
           ("FSDP2 2 ranks x 1 thread", 1, "fsdp2"), ("1 process x 1 thread", 1, None)]


def run(recipe: Path, out: Path, name: str, strategy: str | None) -> dict:
    if strategy is None:
        cmd = [sys.executable, "-m", "stagewise", "run"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "stagewise",
               "run"]
    cmd += [str(recipe), f"--name={name}", f"--out_dir={out}"]
    if strategy:
        cmd.append(f"--parallel.strategy={strategy}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    memory = next(iter(json.loads((out / name / "memory.json").read_text()).values()))
    held = memory.get("measured_rank") or memory["predicted"]  # one process: its whole state, as predicted
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[3:]),
            "peak_rss": records[-1]["peak_mem_bytes"], "loss": records[-1]["loss"],
            "state_held": held["weights"] + held["gradients"] + held["optimizer"]}


def checkpoint_wait(repeats: int = 3) -> dict:
    import torch

    from stagewise.checkpoint.store import begin_checkpoint, save_checkpoint
    from stagewise.config.schema import ModelConfig
    from stagewise.model import Transformer

    torch.set_num_threads(2)
    model = Transformer(ModelConfig(vocab_size=8192, **MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 8192, (2, 64))
    model(x).float().mean().backward()
    opt.step()
    out = {"state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()) +
           sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}
    sync, began, total = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            t0 = time.perf_counter()
            save_checkpoint(Path(d) / "sync", i, model, opt, {}, keep_last=1)
            sync.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pending = begin_checkpoint(Path(d) / "async", i, model, opt, {}, keep_last=1, background=True)
            began.append(time.perf_counter() - t0)
            pending.wait()
            total.append(time.perf_counter() - t0)
    return {**out, "sync_s": statistics.median(sync), "async_wait_s": statistics.median(began),
            "async_total_s": statistics.median(total)}


def table(rec: dict) -> str:
    base = rec["runs"][0]
    lines = ["| configuration | tokens/s | vs 1 process | state held (rank 0) | peak RSS (rank 0) | last loss |",
             "|---|---|---|---|---|---|"]
    for r in rec["runs"]:
        lines.append(f"| {r['label']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['state_held'] / 2**20:,.0f} MiB | {r['peak_rss'] / 2**20:,.0f} MiB | {r['loss']:.4f} |")
    c = rec["checkpoint"]
    lines += ["", f"checkpoint of {c['state_bytes'] / 2**20:,.0f} MiB (weights + AdamW): the loop waits "
              f"{c['sync_s']:.3f} s synchronous, {c['async_wait_s']:.3f} s async "
              f"(the background write takes {c['async_total_s']:.3f} s in all)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    rec = {"bench": "distributed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(), "model": MODEL, "steps": args.steps, "global_batch": "8 x 256 tokens", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, threads, strategy in CONFIGS:
            recipe = tmp / f"r{threads}.yaml"
            recipe.write_text(RECIPE.format(threads=threads, model=json.dumps(MODEL), steps=args.steps,
                                            cache=ROOT / "bench" / ".cache"))
            r = run(recipe, tmp / "runs", f"{strategy or 'single'}-{threads}t", strategy)
            rec["runs"].append({"label": label, "strategy": strategy, **r})
            print(f"{label}: {r['tokens_per_s']:,.0f} tok/s, peak RSS {r['peak_rss'] / 2**20:,.0f} MiB", flush=True)
    rec["checkpoint"] = checkpoint_wait()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(table(rec))


if __name__ == "__main__":
    main()
