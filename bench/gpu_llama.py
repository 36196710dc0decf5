"""GPU throughput of a ~1B-parameter Llama under bf16 autocast and torch.compile, with MFU.

    python bench/gpu_llama.py                         # Llama-3.2-1B shape, 4 x 2048 tokens per step
    python bench/gpu_llama.py --preset tiny --device cpu --steps 2   # smoke test of this script

Trains stagewise's own step function (fused AdamW, gradient clipping, the fused chunked loss,
regionally compiled blocks) on random tokens. The timed steps run under
`torch.cuda.set_sync_debug_mode("error")`, so any host-device synchronisation inside the step
raises instead of silently stalling the GPU; the one read-back per timed window is outside it.

MFU is reported twice: against the GPU's datasheet bf16 dense peak (the convention of torchtitan
and the MFU literature; DATASHEET_BF16 below, unknown GPUs have none) and against the GEMM peak
measured on this GPU (stagewise.train.metrics.peak_flops). Results are appended to
bench/results/gpu_llama.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from stagewise.config.schema import ModelConfig, OptimConfig, PrecisionConfig
from stagewise.model import Transformer, param_counts
from stagewise.model.flops import flops_per_token
from stagewise.objectives import Batch, causal_lm_loss
from stagewise.optim import build_optimizer
from stagewise.precision import build_precision
from stagewise.train.metrics import _device_name, peak_flops, peak_memory_bytes
from stagewise.train.step import train_step

RESULTS = Path(__file__).parent / "results" / "gpu_llama.jsonl"

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (no sparsity), FLOP/s, matched by substring
# of torch.cuda.get_device_name(), most specific first.
DATASHEET_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
                  ("GH200", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]

PRESETS = {
    # Llama-3.2-1B's shape: 1.24B parameters with the tied 128k-vocabulary embedding.
    "llama-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                     rope_base=500000.0, tie_embeddings=True),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
}


def datasheet_peak(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b", choices=list(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--no-compile", action="store_true", help="eager blocks (for comparison)")
    a = p.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=a.seq, **PRESETS[a.preset])
    precision = build_precision(PrecisionConfig(mode="bf16-mixed"), device)
    model = precision.setup(Transformer(cfg).to(device))
    model.compile_blocks(not a.no_compile)
    opt = precision.setup_optimizer(build_optimizer(OptimConfig(lr=1e-4), model, device))
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device=device)
    batch = [Batch(tokens[:, :-1], tokens[:, 1:])]
    n_targets = a.batch * a.seq

    def step():
        return train_step(model, opt, precision, causal_lm_loss, batch, lr=1e-4, grad_clip=1.0,
                          normaliser=n_targets)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_sync_debug_mode("error")
    t0 = time.perf_counter()
    for _ in range(a.steps):
        result = step()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    loss = result.host().loss  # the one read-back, which also waits for the last step
    dt = time.perf_counter() - t0

    tps = n_targets * a.steps / dt
    fpt = flops_per_token(cfg, a.seq)
    name = _device_name(device)
    sheet = datasheet_peak(name) if device.type == "cuda" else None
    measured = peak_flops(device, torch.bfloat16)
    record = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "python": platform.python_version(), "config": vars(a), "params": param_counts(cfg)["total"],
              "flops_per_token": fpt, "tokens_per_s": tps, "warmup_s": warmup_s, "loss": loss,
              "mfu_datasheet": fpt * tps / sheet if sheet else None, "datasheet_peak": sheet,
              "mfu_measured_gemm": fpt * tps / measured, "measured_peak": measured,
              "peak_mem_bytes": peak_memory_bytes(device)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{name}: {a.preset} ({record['params'] / 1e9:.2f}B params), batch {a.batch} x {a.seq}, "
          f"{'eager' if a.no_compile else 'compiled'}; warm-up {warmup_s:.0f} s")
    print(f"tokens/s {tps:,.0f}; MFU {'n/a' if sheet is None else f'{100 * fpt * tps / sheet:.1f}%'} of the "
          f"datasheet bf16 peak, {100 * fpt * tps / measured:.1f}% of the measured GEMM peak "
          f"({measured / 1e12:.0f} TFLOP/s); peak memory {record['peak_mem_bytes'] / 2**30:.1f} GiB; loss {loss:.3f}")


if __name__ == "__main__":
    main()
