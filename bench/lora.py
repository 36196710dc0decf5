"""LoRA fine-tuning of the real google/gemma-3-270m on CPU: stagewise against transformers + peft with
the same settings, alternating in one run; then the memory of an NF4-packed base against bf16.

    python bench/lora.py                  # 8 steps per run, batch 4 x 256, 2 rounds
    python bench/lora.py --rounds 1 --steps 6

Settings on both sides: LoRA r 16, alpha 32, dropout 0, every linear layer of the blocks (q, k, v,
o, gate, up, down; not the tied head), AdamW lr 2e-4 (fused), clipping 1.0, bf16 compute (the CPU
bf16 emulation where this CPU has no native bf16 GEMM; the same context on both sides), the same
token windows of the same text with the same tokenizer.

  stagewise     `stagewise run` of a recipe with init_from the imported model and an adapter section,
                in a child process (precision bf16-mixed: the frozen block weights are stored in bf16,
                which autocast rounds them to anyway; embedding / head and norms fp32).
  peft          the GGUF loaded by transformers in fp32, SDPA attention, peft.get_peft_model with the
                same LoraConfig, in its own child process.
tokens/s: the median over steps after the first two; peak RSS: the child's high-water mark (VmHWM).
The NF4 row is a stagewise run with adapter.base_quant nf4 (same steps), against the bf16 rows.
Appends one record to bench/results/lora.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_gemma import CACHE, ROOT, hf_steps, prepare, run  # noqa: E402  (the model, the text, the HF loop)

RESULTS = ROOT / "bench" / "results" / "lora.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe(model: Path, docs: Path, a, name: str, quant: str) -> Path:
    path = CACHE / "runs" / f"{name}.yaml"
    path.write_text(f"""name: {name}
out_dir: {CACHE / 'runs'}
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
  lr: 2.0e-4
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
adapter:
  kind: lora
  r: 16
  alpha: 32
  target_modules: [all-linear]
  base_quant: {quant}
""")
    return path


def peft_child(a) -> None:
    """The transformers + peft side: prints tokens/s per step, then the process's peak RSS."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    prepare()
    gguf = next((CACHE / "gguf").glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    hf_steps(model, [p for p in model.parameters() if p.requires_grad], a, lr=2e-4)


def stagewise_run(model, docs, a, tag: str, quant: str) -> dict:
    from stagewise import rundir

    name = datetime.datetime.now().strftime(f"lora-{tag}-%Y%m%d-%H%M%S")
    rec = recipe(model, docs, a, name, quant)
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", "run", str(rec)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"stagewise run failed:\n{err[-3000:]}")
    rows = [r for r in rundir.read_metrics(CACHE / "runs" / name / rundir.METRICS) if "tokens_per_s" in r]
    rates = [r["tokens_per_s"] for r in rows][2:]
    return {"tokens_per_s": statistics.median(rates), "rates": rates,
            "peak_rss_bytes": max(r["peak_mem_bytes"] for r in rows),
            "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def peft_run(a) -> dict:
    out = run([sys.executable, __file__, "--child", f"--steps={a.steps}", f"--batch={a.batch}", f"--seq={a.seq}"])
    lines = out.strip().splitlines()
    steps = [line.split() for line in lines if line.startswith("step")]
    rates = [float(s[-1]) for s in steps][2:]
    return {"tokens_per_s": statistics.median(rates), "rates": rates, "peak_rss_bytes": int(lines[-1]),
            "first_loss": float(steps[0][3]), "last_loss": float(steps[-1][3])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        peft_child(a)
        return
    import torch

    from stagewise.train.metrics import _device_name

    model, docs = prepare()
    (CACHE / "runs").mkdir(parents=True, exist_ok=True)
    rounds = []
    for i in range(a.rounds):
        sw = stagewise_run(model, docs, a, "bf16", "none")
        pf = peft_run(a)
        rounds.append({"stagewise": sw, "peft": pf})
        print(f"round {i}: stagewise {sw['tokens_per_s']:.1f} tok/s {sw['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"peft {pf['tokens_per_s']:.1f} tok/s {pf['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    nf4 = stagewise_run(model, docs, a, "nf4", "nf4")
    med = lambda side, key: statistics.median(r[side][key] for r in rounds)  # noqa: E731
    result = {"date": datetime.date.today().isoformat(), "machine": _device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": a.steps, "batch": a.batch,
              "seq": a.seq, "rounds": rounds, "nf4": nf4,
              "ratio_tokens_per_s": med("stagewise", "tokens_per_s") / med("peft", "tokens_per_s"),
              "ratio_peak_rss": med("stagewise", "peak_rss_bytes") / med("peft", "peak_rss_bytes"),
              "nf4_vs_bf16_peak_rss": nf4["peak_rss_bytes"] / med("stagewise", "peak_rss_bytes")}
    print(f"stagewise / peft: {result['ratio_tokens_per_s']:.2f}x tokens/s, {result['ratio_peak_rss']:.2f}x peak RSS "
          f"(medians of {a.rounds} rounds)")
    print(f"nf4 base: {nf4['tokens_per_s']:.1f} tok/s, peak RSS {nf4['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"({result['nf4_vs_bf16_peak_rss']:.2f}x the bf16 base)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
