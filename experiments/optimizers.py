"""Optimizer experiment 12: memory-efficient optimizers against AdamW at equal tokens.

Claims tested:
  - 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): the same loss
    as 32-bit AdamW with about a quarter of its optimizer state.
  - GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
    up to 65.5% less optimizer memory with loss comparable to full-rank AdamW (82.5% with 8-bit GaLore,
    not run here: its moments are galore's, quantized as adamw-8bit's are).
  - Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
    Constraint?"): GaLore's memory with full-rank-like quality (the scaled residual of the projection).
  - APOLLO (Zhu et al. 2025, "APOLLO: SGD-like Memory, AdamW-level Performance"): AdamW-level loss at
    SGD-like memory; APOLLO-Mini (rank 1, tensor-wise scaling) with near-zero optimizer state.
  - Muon (Jordan et al. 2024): faster convergence than AdamW at equal tokens.
Set-up: base.yaml (4-layer, 128-wide Llama on the CPython standard library, seq 128 x batch 16 =
2,048 tokens per step, bf16-mixed, lr 3e-3 cosine to 3e-4 after 30 warmup steps), STEPS steps per run,
validation every 50 steps, one run per optim.name and seed; every run sees the same tokens (the seed
sets initialisation and data order). STEPS is 200, not base.yaml's 300, so that 7 configurations x 3
seeds fit ~16 minutes on 2 cores (adamw-8bit's CPU steps are ~1.8x slower).
Settings, each the paper's or stagewise's default unless said:
  - One lr (3e-3) for every kind: the GaLore and APOLLO papers train at AdamW's lr and put the
    difference into their scale factor, which stagewise applies by default (optim.proj_scale: 0.25
    for galore/fira, sqrt(1) for apollo, sqrt(128) for apollo-mini). Muon's half uses
    optim.muon_lr_adjust=match-rms-adamw (its update scaled to AdamW's RMS), so the same lr serves it.
  - Rank d_model / 4 = 32 (apollo-mini: 1) on every attention and MLP matrix (optim.targets); the
    tied embedding, the norms and everything else keep AdamW under every kind, so their state is
    in every row's optimizer bytes.
  - optim.update_proj_gap=50 for the projected kinds, not the papers' (and stagewise's default) 200:
    200 is sized for runs of thousands of steps; in a 200-step run it would keep the first subspace
    (fixed during warmup) for the whole run, while 50 refreshes it 3 times.
Measured per run: final validation loss and bits per byte (the last evaluation, metrics.jsonl);
tokens/s (median over the steps after the first 5, the memory-probe step excluded); and from
RUN_DIR/memory.json the probe step's measured components (torch's MemTracker on step 2, when the
optimizer state exists): optimizer state, tracked peak, activations, and the process's peak RSS
over the whole run.
"""

from __future__ import annotations

import json
import statistics
import sys

import _common as c

EXP = "optimizers"
STEPS = 200
EVAL_EVERY = 50
PROJ_GAP = 50
REF = "adamw"
KINDS = ("adamw", "adamw-8bit", "galore", "fira", "apollo", "apollo-mini", "muon")
PROJECTED = {"galore", "galore-8bit", "fira", "apollo", "apollo-mini"}
CLAIMS = {
    "adamw": "baseline",
    "adamw-8bit": "same loss as 32-bit (Dettmers et al. 2022)",
    "galore": "65.5% less optimizer memory, comparable loss (Zhao et al. 2024)",
    "fira": "full-rank-like loss at GaLore's memory (Chen et al. 2024)",
    "apollo": "AdamW-level loss, SGD-like memory (Zhu et al. 2025)",
    "apollo-mini": "AdamW-level loss, ~zero state (Zhu et al. 2025)",
    "muon": "faster convergence at equal tokens (Jordan et al. 2024)",
}
SPECS = [c.Spec(k, k.replace("-", "_"), (f"--train.steps={STEPS}", f"--eval.every={EVAL_EVERY}", f"--optim.name={k}",
                                         *((f"--optim.update_proj_gap={PROJ_GAP}",) if k in PROJECTED else ())))
         for k in KINDS]
MEM_KEYS = ("optimizer", "peak", "activations", "process", "weights", "gradients")
TITLE = (f"Memory-efficient optimizers vs AdamW at equal tokens ({STEPS} steps x 2,048 tokens, d128 x 4 layers, "
         f"bf16-mixed, lr 3e-3 cosine to 3e-4)")
MIB = 2 ** 20


def memory(run_dir) -> dict:
    """The measured components (bytes) of the run's stage in RUN_DIR/memory.json; {} without a probe."""
    path = run_dir / getattr(c.rundir, "MEMORY", "memory.json")
    if not path.is_file():
        return {}
    stages = [rec for rec in json.loads(path.read_text()).values() if isinstance(rec, dict) and "measured" in rec]
    return stages[-1]["measured"] if stages else {}


def tokens_per_s(recs: list[dict]) -> float | None:
    # the first 5 steps left out: warm-up of the allocator and the memory probe (step 2, memory.json at_step)
    vals = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r.get("step", 0) > 5]
    return statistics.median(vals) if vals else None


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    evals = [r for r in recs if "val_loss" in r]
    final = {"val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1].get("val_bpb"),
             "train_loss": recs[-1]["loss"], "tokens_per_s": tokens_per_s(recs)}
    mem = memory(run["dir"])
    final.update({f"mem_{k}": mem.get(k) for k in MEM_KEYS})
    curves = {"val_loss": c.curve(recs, "val_loss"), "loss": c.smooth(c.curve(recs, "loss"))}
    return final, curves


def main():
    print(f"{EXP}:")
    runs = c.run_all(EXP, SPECS)
    c.save_record(EXP, TITLE, {"steps": STEPS, "eval_every": EVAL_EVERY, "update_proj_gap": PROJ_GAP,
                               "kinds": list(KINDS), "lr": 3.0e-3, "precision": "bf16-mixed"}, runs, summarise)
    c.write_outputs(sys.modules[__name__])


def _ratios(values: list[float], reference: list[float]) -> list[float]:
    """Per-seed ratios value / reference (the same seed's AdamW run)."""
    return [v / r for v, r in zip(values, reference) if v is not None and r]


def _mem_cell(values: list[float], reference: list[float]) -> str:
    m, _ = c.mean_std(values)
    if m != m:  # nan: no probe
        return "n/a"
    pct, _ = c.mean_std(_ratios(values, reference))
    return f"{m / MIB:.2f} MiB ({100 * pct:.0f}%)"


def table(record: dict) -> str:
    keys = ["val_loss", "val_bpb", "tokens_per_s"] + [f"mem_{k}" for k in MEM_KEYS]
    col = {k: c.by_label(record, k) for k in keys}
    rows = []
    for lab in record["labels"]:
        tps_ratio = _ratios(col["tokens_per_s"][lab], col["tokens_per_s"][REF])
        tps, _ = c.mean_std(col["tokens_per_s"][lab])
        rows.append([lab, c.cell(col["val_loss"][lab]),
                     c.delta_cell(col["val_loss"][lab], col["val_loss"][REF]),
                     c.cell(col["val_bpb"][lab]),
                     _mem_cell(col["mem_optimizer"][lab], col["mem_optimizer"][REF]),
                     _mem_cell(col["mem_peak"][lab], col["mem_peak"][REF]),
                     _mem_cell(col["mem_activations"][lab], col["mem_activations"][REF]),
                     _mem_cell(col["mem_process"][lab], col["mem_process"][REF]),
                     f"{c.cell(tps_ratio, 2)}× ({tps:,.0f})",
                     CLAIMS.get(lab, "")])
    header = ["optimizer", "final val loss", "Δ vs AdamW", "final val bpb", "optimizer state (% of AdamW)",
              "peak tracked (% of AdamW)", "activations", "process peak RSS", "tokens/s vs AdamW (tok/s)", "claim"]
    s = record["settings"]
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n"
            f"Validation loss in nats/token at step {s['steps']} (one tokenizer for all runs); Δ is per seed against "
            f"the same seed's AdamW run. Memory columns: torch's MemTracker on the probe step (step 2, optimizer state "
            f"allocated), mean over seeds, % the mean per-seed ratio to AdamW; optimizer state counts every "
            f"parameter's, including the tied embedding and norms, which keep AdamW under every kind; process peak "
            f"RSS is the whole run's high-water mark (VmHWM). Tokens/s: median over steps 6–{s['steps']} without the "
            f"probe step, as a per-seed ratio to AdamW (two runs train at once, so it carries the other run's load); "
            f"in brackets the mean tokens/s. Projected kinds refresh the projector every {s['update_proj_gap']} steps; "
            f"one lr for all (stagewise's default scale factors and Muon's match-rms-adamw adjustment).\n\n"
            + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (a, b, m) = c.figure(3)
    for i, lab in enumerate(record["labels"]):
        ls = "-" if lab in (REF, "muon") else "--"
        c.band(a, record, lab, "val_loss", f"C{i}", ls)
        c.band(b, record, lab, "loss", f"C{i}", ls)
    a.set(xlabel="step", ylabel="validation loss", title="validation loss (mean of seeds, min-max band)")
    b.set(xlabel="step", ylabel="train loss (10-step mean)", title="train loss (mean of seeds)")
    a.legend(fontsize=7)
    loss, opt = c.by_label(record, "val_loss"), c.by_label(record, "mem_optimizer")
    for i, lab in enumerate(record["labels"]):
        x, _ = c.mean_std(opt[lab])
        y, e = c.mean_std(loss[lab])
        if x == x:
            m.errorbar([x / MIB], [y], yerr=[0 if e != e else e], fmt="o", color=f"C{i}", capsize=3, label=lab)
            m.annotate(lab, (x / MIB, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    m.set(xlabel="optimizer state (MiB, measured)", ylabel=f"final validation loss (step {record['settings']['steps']})",
          title="loss vs optimizer memory (mean ± std of seeds)")
    c.save_figure(fig, path)


if __name__ == "__main__":
    c.write_outputs(sys.modules[__name__]) if "--tables" in sys.argv[1:] else main()
