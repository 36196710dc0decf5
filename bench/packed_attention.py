"""Block-causal attention for packed rows (several documents per row): SDPA with a boolean
[B, 1, T, T] mask against torch.nn.attention.flex_attention with a block mask (compiled), side
by side on random q/k/v at a few shapes.

    python bench/packed_attention.py                       # B 4, T 256/1024, 4-8 heads, head_dim 64
    python bench/packed_attention.py --shapes 4x2048x8 --rounds 3

Two timings per shape, fp32 as the CPU trains:
  * train: forward + backward (what Transformer.forward(doc_ids=...) costs in training);
  * infer: forward under no_grad (evaluation, a frozen reference model's log-probabilities).
`sdpa_causal` (is_causal, ignoring documents) is not a packing implementation: it is the floor a
document mask could approach by skipping masked blocks. Variants alternate within each round,
rotating who goes first; the median over rounds is printed and every round's time appended to
bench/results/packed_attention.jsonl. A variant torch cannot run is recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from stagewise.train.metrics import _device_name

RESULTS = Path(__file__).parent / "results" / "packed_attention.jsonl"


def packed_doc_ids(B: int, T: int, docs: int, g: torch.Generator) -> torch.Tensor:
    """[B, T] document ids: each row cut at docs - 1 random points (mean document length T / docs)."""
    ids = []
    for _ in range(B):
        cuts = torch.zeros(T, dtype=torch.long)
        cuts[torch.randperm(T - 1, generator=g)[:docs - 1] + 1] = 1
        ids.append(cuts.cumsum(0))
    return torch.stack(ids)


def variants(doc_ids: torch.Tensor, H: int):
    """name -> attention(q, k, v); the masks are built once per batch, outside the timing (the
    model builds one per forward and shares it across layers)."""
    B, T = doc_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bool_mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)

    def same_doc_causal(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (k <= q)

    block_mask = create_block_mask(same_doc_causal, B, None, T, T, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    return {
        "sdpa_bool_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
        "flex_compiled": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
        "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }, 100 - block_mask.sparsity()


def timed(fn, q, k, v, train: bool) -> float:
    t0 = time.perf_counter()
    if train:
        fn(q, k, v).sum().backward()
    else:
        with torch.no_grad():
            fn(q, k, v)
    return time.perf_counter() - t0


def run(fns, q, k, v, train: bool, rounds: int) -> dict:
    """{name: list of round times, or the error message}; each variant warms up (compiles) once."""
    out, live = {}, []
    for name, fn in fns.items():
        try:
            timed(fn, q, k, v, train)
            live.append(name)
            out[name] = []
        except Exception as e:  # noqa: BLE001 - an unsupported variant is a result, not a failure
            out[name] = f"{type(e).__name__}: {e}"
    for r in range(rounds):
        for name in live[r % len(live):] + live[:r % len(live)]:
            out[name].append(timed(fns[name], q, k, v, train))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4x256x4", "4x1024x4", "4x1024x8"], help="BxTxHEADS")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--docs", type=int, default=4, help="documents per row")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    record = {"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
              "loadavg_1m_at_start": os.getloadavg()[0],
              "head_dim": a.head_dim, "docs_per_row": a.docs, "rounds": a.rounds, "shapes": {}}
    for shape in a.shapes:
        B, T, H = map(int, shape.split("x"))
        g = torch.Generator().manual_seed(0)
        doc_ids = packed_doc_ids(B, T, a.docs, g)
        res = {}
        for mode in ("train", "infer"):
            # dynamo skips a function's code for good once its tracing raised (flex's backward
            # on CPU): start each mode afresh.
            torch._dynamo.reset()
            fns, density = variants(doc_ids, H)
            res["mask_density_pct"] = round(density, 1)
            q, k, v = (torch.randn(B, H, T, a.head_dim, generator=g).requires_grad_(mode == "train") for _ in range(3))
            res[mode] = run(fns, q, k, v, mode == "train", a.rounds)
            for name, times in res[mode].items():
                shown = f"{statistics.median(times) * 1e3:8.1f} ms" if isinstance(times, list) else times[:70]
                print(f"{shape:>10} {mode}: {name:>15}: {shown}", flush=True)
        record["shapes"][shape] = res
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
