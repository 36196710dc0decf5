"""The fused head + cross-entropy (stagewise/model/loss.py) at real vocabulary sizes: time of one
forward+backward per rows-per-chunk setting, against the unfused reference (materialised logits).

    python bench/loss_chunks.py                          # Gemma 3 270m, Qwen3 0.6B, Llama 3.2 1B heads
    python bench/loss_chunks.py --rows 32 320 1024 --shapes 262144x640

bf16 autocast as the trainer runs it (through stagewise's precision, so the CPU bf16 emulation is
used where this CPU has no native bf16 GEMM). Each setting runs --repeats times after one
warm-up; the median is printed and appended to bench/results/loss_chunks.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from stagewise.config.schema import PrecisionConfig
from stagewise.model.loss import chunk_rows, linear_cross_entropy, logits_cross_entropy
from stagewise.precision import build_precision
from stagewise.train.metrics import _device_name

RESULTS = Path(__file__).parent / "results" / "loss_chunks.jsonl"


def one(h, w, t, rows, precision, dtype):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    t0 = time.perf_counter()
    with precision.autocast():
        if rows == 0:
            loss = logits_cross_entropy(torch.nn.functional.linear(h, w), t)
        else:
            loss = linear_cross_entropy(h, w, t, dtype, chunk=rows)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["262144x640", "151936x1024", "128256x2048"],
                   help="VOCABxD_MODEL head shapes")
    p.add_argument("--tokens", type=int, default=1024, help="rows per call (one micro-batch)")
    p.add_argument("--rows", nargs="+", type=int, default=None,
                   help="rows per chunk to time (0 = unfused reference); default: 32, 128, the default rule, tokens, 0")
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    precision = build_precision(PrecisionConfig(mode=a.precision), torch.device("cpu"))
    dtype = precision.compute_dtype
    record = {"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": a.precision,
              "emulated_bf16": precision.emulates_bf16, "tokens": a.tokens, "shapes": {}}
    for shape in a.shapes:
        V, d = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        h = torch.randn(a.tokens, d, generator=g)
        w = torch.randn(V, d, generator=g) * d ** -0.5
        t = torch.randint(0, V, (a.tokens,), generator=g)
        default = chunk_rows(V, d, dtype.itemsize)
        rows_list = a.rows or sorted({32, 128, min(default, a.tokens), a.tokens}) + [0]
        times = {}
        for rows in rows_list:
            one(h, w, t, rows, precision, dtype)
            times[rows] = statistics.median(one(h, w, t, rows, precision, dtype) for _ in range(a.repeats))
            label = "unfused" if rows == 0 else f"{rows} rows" + (" (default)" if rows == default else "")
            print(f"V {V:>7} d {d:>5}: {label:>18}: {times[rows]:7.2f} s", flush=True)
        record["shapes"][shape] = {"default_rows": default, "seconds": {str(k): v for k, v in times.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
