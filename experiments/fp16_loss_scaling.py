"""Experiment 1: fp16 with and without loss scaling (Micikevicius et al. 2018, "Mixed Precision Training").

Claim: without loss scaling many gradient values fall below fp16's range (flush to zero or
lose precision as subnormals), and training suffers; scaling the loss shifts them back into
range and fp16 training matches fp32.

Runs (same data order, init and schedule, 300 steps): fp32; fp16-mixed with dynamic loss
scaling (init 2^16); fp16-mixed with the scale pinned to 1 (no scaling). On this CPU fp16
is emulated by rounding every matmul input, output and gradient to fp16 (docs/precision.md).
Per-layer underflow: on one fixed training batch, the fp32 weight gradients of the trained
fp32 model are multiplied by S and rounded to fp16; we count the nonzero elements that
become 0 (flushed) or subnormal, per weight matrix, for S = 1 and S = the scale the scaled
run ended with.
"""

from __future__ import annotations

import json

import torch

from _common import HERE, figure, final_val, run, smooth, write_table

EXP = "fp16_loss_scaling"
UNSCALED = ("--precision.loss_scale.init_scale=1", "--precision.loss_scale.max_scale=1",
            "--precision.loss_scale.min_scale=1")


def per_layer_underflow(run_dir, scales):
    from stagewise.data import eval_batches, open_dataset
    from stagewise.objectives import Batch, causal_lm_loss
    from stagewise.rundir import load_model

    model, _, _ = load_model(run_dir / "final", torch.device("cpu"))
    info = json.loads((run_dir / "run_info.json").read_text())
    x, y = eval_batches(open_dataset(info["dataset"]).train, 128, 16, 1)[0]
    model.train()
    out = causal_lm_loss(model, Batch(x, y))
    (out.loss_sum / out.num_targets).backward()
    rows = []
    tiny = torch.finfo(torch.float16).tiny
    for name, p in model.named_parameters():
        if p.ndim < 2 or p.grad is None:
            continue
        g = p.grad.flatten().double()
        nz = g != 0
        row = [name]
        for s in scales:
            h = (g * s).to(torch.float16).double()
            flushed = (nz & (h == 0)).sum().item() / nz.sum().item()
            subnormal = ((h != 0) & (h.abs() < tiny)).sum().item() / nz.sum().item()
            row += [100 * flushed, 100 * subnormal]
        rows.append(row)
    return rows


def main():
    print(f"{EXP}:")
    runs = {
        "fp32": run(EXP, "fp32", "--precision.mode=fp32"),
        "fp16 + loss scaling": run(EXP, "fp16_scaled", "--precision.mode=fp16-mixed"),
        "fp16, no loss scaling": run(EXP, "fp16_unscaled", "--precision.mode=fp16-mixed", *UNSCALED),
    }
    final_scale = [r["loss_scale"] for r in runs["fp16 + loss scaling"] if "loss_scale" in r][-1]
    rows = []
    for label, recs in runs.items():
        tele = [r for r in recs if "grad_flushed_frac" in r]
        lost = [100 * (r["grad_flushed_frac"] + r["grad_subnormal_frac"]) for r in tele]
        skipped = max([r.get("skipped_steps", 0) for r in recs] + [0])
        rows.append([label, recs[-1]["loss"], final_val(recs), final_val(recs) - final_val(runs["fp32"]),
                     sum(lost) / len(lost) if lost else "n/a", skipped])
    layer_rows = per_layer_underflow(HERE / "runs" / EXP / "fp32", [1.0, final_scale])
    notes = (f"Per weight matrix, on one batch, gradients of the trained fp32 model: % of nonzero elements "
             f"flushed to zero / made subnormal when stored in fp16 at loss scale S=1 and S={final_scale:g} "
             f"(the scaled run's final scale).\n\n| layer | flushed % (S=1) | subnormal % (S=1) | flushed % "
             f"(S={final_scale:g}) | subnormal % (S={final_scale:g}) |\n|---|---|---|---|---|\n" +
             "\n".join(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} |" for r in layer_rows))
    write_table(EXP, "fp16 with and without loss scaling (300 steps, d128 x 4 layers)",
                ["run", "final train loss", "final val loss", "val gap vs fp32",
                 "mean % grads flushed+subnormal (telemetry)", "skipped steps"], rows, notes)
    fig, (a, b), save = figure(EXP, 2)
    for i, (label, recs) in enumerate(runs.items()):
        a.plot([r["step"] for r in recs], smooth([r["loss"] for r in recs]), label=label, color=f'C{i}')
        tele = [r for r in recs if "grad_flushed_frac" in r]
        if tele:
            b.plot([r["step"] for r in tele], [100 * (r["grad_flushed_frac"] + r["grad_subnormal_frac"]) for r in tele],
                   label=label, color=f'C{i}')
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss")
    b.set(xlabel="step", ylabel="% sampled weight-grad elements", title="flushed + subnormal in the grad format")
    a.legend()
    b.legend()
    save()


if __name__ == "__main__":
    main()
