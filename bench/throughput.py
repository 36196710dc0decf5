"""Training throughput: stagewise vs transformers' LlamaForCausalLM, same architecture, same machine.

Both train the same Llama configuration with AdamW under bf16 autocast (or fp32 with
--precision fp32) on random tokens. Timed rounds alternate between the two in one
process, so machine noise hits both alike; peak memory is measured in a separate child
process per framework (peak RSS cannot be attributed inside one process).

    python bench/throughput.py                     # the reference configuration
    python bench/throughput.py --d-model 768 --layers 12 --heads 12 --ffn 2048 --seq 1024 --batch 4
    python bench/throughput.py --hf-config gemma-3-270m --batch 4 --seq 256   # a real model's shape
    python bench/throughput.py --hf-config qwen3-0.6b --layers 8              # fewer layers: say so

--hf-config takes a name from bench/configs/ (gemma-3-270m, qwen3-0.6b, llama-3.2-1b), a
directory holding a config.json, or a config.json file: both frameworks then build that
architecture (transformers' own class for its model_type; stagewise through its import
mapping) with random weights. --layers then overrides the number of layers only.

The last line is `stagewise/transformers tokens_per_s ratio: X.XX`. Results are appended
to bench/results/throughput.jsonl with the machine description and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from stagewise.config.schema import ModelConfig, OptimConfig, PrecisionConfig
from stagewise.interop.hf_families import FAMILIES, from_hf_config, to_hf_config
from stagewise.model import Transformer
from stagewise.model.flops import flops_per_token
from stagewise.objectives import Batch, causal_lm_loss
from stagewise.optim import build_optimizer
from stagewise.precision import build_precision
from stagewise.train.metrics import _device_name, peak_flops, peak_memory_bytes
from stagewise.train.step import train_step

RESULTS = Path(__file__).parent / "results" / "throughput.jsonl"


CONFIGS = Path(__file__).parent / "configs"


def hf_config(a) -> dict | None:
    """The HF config.json dict of --hf-config (with --layers applied), or None."""
    if not a.hf_config:
        return None
    path = Path(a.hf_config)
    if not path.exists():
        path = CONFIGS / f"{a.hf_config}.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise SystemExit(f"--hf-config: {a.hf_config!r} is neither a config.json, a directory holding one, "
                         f"nor one of {names}")
    hf = json.loads(path.read_text())
    if a.layers is not None:
        hf["num_hidden_layers"] = a.layers
        if "layer_types" in hf:
            hf["layer_types"] = hf["layer_types"][:a.layers]
        if "max_window_layers" in hf:
            hf["max_window_layers"] = min(hf["max_window_layers"], a.layers)
    return hf


def model_config(a) -> ModelConfig:
    hf = hf_config(a)
    if hf is not None:
        return replace(from_hf_config(hf), max_seq_len=max(2048, a.seq))
    return ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers or 6, n_heads=a.heads,
                       ffn_dim=a.ffn, tie_embeddings=True, max_seq_len=max(2048, a.seq))


VARIANTS = {
    # name: what it changes from stagewise's defaults (fused loss, fused AdamW, eager blocks)
    "stagewise": {},
    "stagewise+compile": {"compile": True},
    "stagewise-unfused-loss": {"fused_loss": False},
    "stagewise-foreach-adamw": {"adamw": "foreach"},
    "stagewise-math-sdpa": {"sdpa": "math"},
    "transformers": {},
    "transformers+compile": {"compile": True},
}


def build(variant: str, a):
    """(step function, model config) for one variant; the step trains on one random batch."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = model_config(a)
    opts = VARIANTS[variant]
    precision = build_precision(PrecisionConfig(mode=a.precision), device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g)
    sdpa = contextlib.nullcontext
    if opts.get("sdpa") == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    if variant.startswith("stagewise"):
        model = precision.setup(Transformer(cfg))
        model.fused_loss = opts.get("fused_loss", True)
        model.compile_blocks(precision.compiles(opts.get("compile", False)))
        opt = build_optimizer(OptimConfig(lr=1e-4, implementation=opts.get("adamw", "auto")), model, device)
        batch = Batch(tokens[:, :-1], tokens[:, 1:])

        def step():
            with sdpa():
                return train_step(model, opt, precision, causal_lm_loss, [batch], lr=1e-4, grad_clip=1.0)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

        hf = hf_config(a)
        if hf is None:
            hf_cfg = LlamaConfig(**{k: v for k, v in to_hf_config(cfg, FAMILIES["llama"]).items()
                                    if k not in ("architectures", "model_type", "torch_dtype")})
        else:
            hf_cfg = AutoConfig.for_model(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
        run = torch.compile(model) if opts.get("compile") else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        inputs = tokens[:, :-1]

        def step():
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = run(input_ids=inputs, labels=inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.detach()
    model.train()
    return step, cfg


def memory_child(framework: str, a) -> int:
    """Run a few steps in a fresh process and return its peak RSS in bytes."""
    cmd = [sys.executable, __file__, "--child", framework] + _argv_of(a)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def _argv_of(a) -> list[str]:
    return [f"--vocab={a.vocab}", f"--d-model={a.d_model}", f"--heads={a.heads}", f"--ffn={a.ffn}",
            f"--seq={a.seq}", f"--batch={a.batch}", f"--precision={a.precision}"] \
        + ([f"--layers={a.layers}"] if a.layers is not None else []) \
        + ([f"--hf-config={a.hf_config}"] if a.hf_config else [])


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model/batch arguments shared with bench/profile_step.py."""
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=None, help="number of layers (default 6, or the --hf-config's)")
    p.add_argument("--hf-config", default=None, help="a real model's shape: a name in bench/configs/, a directory "
                   "with a config.json, or a config.json")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per framework")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--variants", nargs="+", default=["stagewise+compile", "stagewise", "transformers"],
                   choices=list(VARIANTS), help="what to time; the first is the headline, compared with "
                   "'transformers' on the last line")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        step, _ = build(a.child, a)
        for _ in range(3):
            step()
        print(peak_memory_bytes(torch.device("cpu")))
        return

    variants = a.variants
    if "transformers" not in variants or not variants[0].startswith("stagewise"):
        p.error("--variants: expected a stagewise variant first and 'transformers' among them")
    mem = {v: memory_child(v, a) for v in variants}
    steps = {}
    for v in variants:
        steps[v], cfg = build(v, a)
        steps[v]()  # warm-up: allocator, thread pool, autocast caches, compilation
        steps[v]()
    tok_per_step = a.batch * a.seq
    rates = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate who goes first
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[v]()
            rates[v].append(tok_per_step * a.steps / (time.perf_counter() - t0))
    # Under the CPU bf16 emulation the GEMMs run in fp32: MFU is against the fp32 peak then.
    precision = build_precision(PrecisionConfig(mode=a.precision), torch.device("cpu"))
    gemm_dtype = precision.gemm_dtype
    peak = peak_flops(torch.device("cpu"), gemm_dtype)
    fpt = flops_per_token(cfg, a.seq)
    result = {"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
              "config": vars(a) | {"child": None}, "model": asdict(cfg), "gemm_dtype": str(gemm_dtype),
              "peak_flops": peak, "flops_per_token": fpt}
    shape = f"{a.hf_config} shape, " if a.hf_config else ""
    print(f"config: {shape}vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
          f"ffn {cfg.ffn_dim}, batch {a.batch} x {a.seq}, {a.precision}; peak {gemm_dtype} GEMM "
          f"{peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    if precision.emulates_bf16:
        print("note: bf16 GEMMs are emulated in fp32 on this CPU (precision/cpu_bf16.py), for transformers too; "
              "train.compile is off there, so stagewise+compile runs eager")
    base = statistics.median(rates["transformers"])
    for v in variants:
        tps = statistics.median(rates[v])
        result[v] = {"tokens_per_s": tps, "mfu": fpt * tps / peak, "peak_rss_bytes": mem[v], "rounds": rates[v]}
        print(f"{v:>24}: {tps:8,.0f} tokens/s  {tps / base:5.2f}x  MFU {100 * fpt * tps / peak:5.1f}%  "
              f"peak RSS {mem[v] / 2**30:.2f} GiB  {mem[v] / mem['transformers']:.2f}x")
    head = variants[0]
    ratio = result[head]["tokens_per_s"] / base
    result["headline"] = head
    result["ratio_tokens_per_s"] = ratio
    result["ratio_peak_rss"] = mem[head] / mem["transformers"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{head}/transformers peak RSS ratio: {result['ratio_peak_rss']:.2f}")
    print(f"stagewise/transformers tokens_per_s ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
