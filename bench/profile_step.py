"""Where one training step's time goes, by op class, for the variants of bench/throughput.py.

    python bench/profile_step.py --hf-config gemma-3-270m --batch 4 --seq 256
    python bench/profile_step.py --variants stagewise transformers --hf-config qwen3-0.6b --layers 8

Takes the same model arguments as throughput.py (it builds the variants with its `build`), runs
two warm-up steps, then profiles one step with torch.profiler and sums each op's self time into:
  loss        everything under the fused head + cross-entropy (stagewise: the head's GEMMs
              included) or under F.cross_entropy (transformers: its head's GEMMs, forward and
              backward, are separate ops and count as gemm)
  optimizer   everything under the optimizer's step and gradient clipping
  gemm        the remaining matrix multiplies (mm, addmm, bmm, linear; the CPU bf16 emulation's ops)
  attention   scaled-dot-product attention kernels (forward and backward)
  alloc/copy  allocation, fills, dtype casts and copies
  other       the rest: elementwise ops, norms, activations, autograd bookkeeping
Appends one record to bench/results/profile_step.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "profile_step.jsonl"
GEMM = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
        "stagewise::emulated_bf16_mm", "stagewise::emulated_bf16_linear", "mkldnn")
ALLOC = ("aten::empty", "aten::empty_strided", "aten::zeros", "aten::zero_", "aten::fill_", "aten::copy_",
         "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")
LOSS_MARKS = ("_LinearCrossEntropy", "aten::cross_entropy", "aten::cross_entropy_loss", "aten::nll_loss",
              "aten::log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_backward")
OPTIM_MARKS = ("Optimizer.step", "clip_grad_norm", "aten::_fused_adamw", "aten::_foreach")


def op_class(event) -> str:
    e = event
    while e is not None:
        name = e.name
        if any(name.startswith(m) for m in LOSS_MARKS) or "LinearCrossEntropy" in name \
                or "NllLoss" in name or "LogSoftmax" in name:
            return "loss"
        if any(m in name for m in OPTIM_MARKS):
            return "optimizer"
        e = e.cpu_parent
    name = event.name
    if name.startswith(GEMM) or "Mm" in name and "Backward" in name:
        return "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in ALLOC:
        return "alloc/copy"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_model_args(p)
    p.add_argument("--variants", nargs="+", default=["stagewise", "transformers"], choices=list(throughput.VARIANTS))
    a = p.parse_args()
    record = {"date": datetime.date.today().isoformat(), "machine": throughput._device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "config": vars(a), "variants": {}}
    for v in a.variants:
        step, _ = throughput.build(v, a)
        step()
        step()
        with profile() as prof:
            step()
        totals: dict[str, float] = {}
        for ev in prof.events():
            if ev.device_type.name != "CPU":
                continue
            k = op_class(ev)
            totals[k] = totals.get(k, 0.0) + ev.self_cpu_time_total / 1e6
        record["variants"][v] = totals
        wall = sum(totals.values())
        print(f"{v:>22}: {wall:6.2f} s  " + "  ".join(f"{k} {t:.2f} ({100 * t / wall:.0f}%)"
                                                       for k, t in sorted(totals.items(), key=lambda kv: -kv[1])),
              flush=True)
        del step
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
