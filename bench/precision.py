"""Tokens/s and peak memory of every precision mode on the foundation's benchmark model (CPU).

Each mode runs in its own child process (so its peak RSS, VmHWM, is its own): the benchmark
Llama (vocab 8192, d_model 384, 6 layers, 6 heads, ffn 1024, tied, batch 8 x 512 by
default), real stagewise set-up (precision.setup, setup_optimizer, train_step), 1 warm-up
step and --steps timed steps on random tokens. Telemetry is off, as in a production run.

    python bench/precision.py                 # every mode
    python bench/precision.py --modes bf16-mixed fp8 --batch 4

On CPU, fp16-mixed is emulated (fp16 rounding around fp32 GEMMs) and fp8 / fake-quant
linears run as exact emulation, so their tokens/s measure the cost of the numerics
emulation, not of fp8 hardware. Results are appended to bench/results/precision.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from stagewise.config.schema import PRECISION_MODES, ModelConfig, OptimConfig, PrecisionConfig
from stagewise.model import Transformer
from stagewise.objectives import Batch, causal_lm_loss
from stagewise.optim import build_optimizer
from stagewise.precision import build_precision
from stagewise.train.metrics import _device_name, peak_memory_bytes
from stagewise.train.step import train_step

RESULTS = Path(__file__).parent / "results" / "precision.jsonl"


def child(mode: str, a) -> dict:
    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = ModelConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, ffn_dim=1024, tie_embeddings=True)
    precision = build_precision(PrecisionConfig(mode=mode, telemetry_every=0), device)
    model = precision.setup(Transformer(cfg))
    opt = precision.setup_optimizer(build_optimizer(OptimConfig(lr=1e-4), model, device))
    tokens = torch.randint(0, 8192, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))
    batch = [Batch(tokens[:, :-1], tokens[:, 1:])]
    train_step(model, opt, precision, causal_lm_loss, batch, 1e-4, 1.0)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = float(train_step(model, opt, precision, causal_lm_loss, batch, 1e-4, 1.0).loss)
    dt = time.perf_counter() - t0
    return {"mode": mode, "tokens_per_s": a.batch * a.seq * a.steps / dt, "peak_rss_bytes":
            peak_memory_bytes(device), "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="*", default=PRECISION_MODES)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    rows = []
    for mode in a.modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, f"--batch={a.batch}", f"--seq={a.seq}",
                              f"--steps={a.steps}"], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-1500:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{mode:>11}: {r['tokens_per_s']:8,.0f} tokens/s   peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB",
              flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps({"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
                            "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "config": {"batch": a.batch, "seq": a.seq, "steps": a.steps}, "results": rows}) + "\n")


if __name__ == "__main__":
    main()
