"""Experiment 1: fp16 with and without loss scaling (Micikevicius et al. 2018, "Mixed Precision Training").

Claim: without loss scaling many gradient values fall below fp16's range (flush to zero or
lose precision as subnormals), and training suffers; scaling the loss shifts them back into
range and fp16 training matches fp32.

Runs (same data order, init and schedule per seed, STEPS steps): fp32; fp16-mixed with dynamic loss
scaling (init 2^16); fp16-mixed with the scale pinned to 1 (no scaling). On this CPU fp16 is
emulated by rounding every matmul input, output and gradient to fp16 (docs/precision.md).
Telemetry (every 10 steps): weight gradients flushed or subnormal in fp16, and activation
gradients lost (zero in fp16 where a well-scaled backward carries gradient; docs/precision.md).
Per-layer underflow: on one fixed training batch, the fp32 weight gradients of seed 1's trained
fp32 model are multiplied by S and rounded to fp16; we count the nonzero elements that become 0
(flushed) or subnormal, per weight matrix, for S = 1 and S = the scale the scaled run ended with.
"""

from __future__ import annotations

import json
import sys

import _common as c

EXP = "fp16_loss_scaling"
STEPS = 120
REF, SCALED, UNSCALED = "fp32", "fp16 + loss scaling", "fp16, no loss scaling"
NO_SCALING = ("--precision.loss_scale.init_scale=1", "--precision.loss_scale.max_scale=1",
              "--precision.loss_scale.min_scale=1")
SPECS = [c.Spec(REF, "fp32", ("--precision.mode=fp32",)),
         c.Spec(SCALED, "fp16_scaled", ("--precision.mode=fp16-mixed",)),
         c.Spec(UNSCALED, "fp16_unscaled", ("--precision.mode=fp16-mixed", *NO_SCALING))]
TITLE = f"fp16 with and without loss scaling ({STEPS} steps, d128 x 4 layers)"


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    tele = [r for r in recs if "grad_flushed_frac" in r]
    act = [r for r in recs if "act_grad_lost_frac" in r]
    scales = [r["loss_scale"] for r in recs if "loss_scale" in r]
    final = {"val_loss": c.last(recs, "val_loss"), "train_loss": recs[-1]["loss"],
             "weight_grad_lost_pct": (100 * sum(r["grad_flushed_frac"] + r["grad_subnormal_frac"] for r in tele)
                                      / len(tele)) if tele else None,
             "act_grad_lost_pct": 100 * sum(r["act_grad_lost_frac"] for r in act) / len(act) if act else None,
             "skipped_steps": max([r.get("skipped_steps", 0) for r in recs] + [0]),
             "final_loss_scale": scales[-1] if scales else None}
    curves = {"loss": c.smooth(c.curve(recs, "loss"))}
    if act:
        curves["act_grad_lost_frac"] = c.curve(recs, "act_grad_lost_frac")
    if tele:
        curves["weight_grad_lost_frac"] = [[r["step"], r["grad_flushed_frac"] + r["grad_subnormal_frac"]] for r in tele]
    return final, curves


def per_layer_underflow(run_dir, scales) -> list[list]:
    import torch

    from stagewise.data import eval_batches, open_dataset
    from stagewise.objectives import Batch, causal_lm_loss
    from stagewise.rundir import load_model

    model, _, _ = load_model(run_dir / "final", torch.device("cpu"))
    info = json.loads((run_dir / "run_info.json").read_text())
    x, y = eval_batches(open_dataset(info["dataset"]).train, 128, 16, 1)[0]
    model.train()
    out = causal_lm_loss(model, Batch(x, y))
    (out.loss_sum / out.normaliser).backward()
    rows, tiny = [], torch.finfo(torch.float16).tiny
    for name, p in model.named_parameters():
        if p.ndim < 2 or p.grad is None:
            continue
        g = p.grad.flatten().double()
        nz = g != 0
        row = [name]
        for s in scales:
            h = (g * s).to(torch.float16).double()
            row += [100 * (nz & (h == 0)).sum().item() / nz.sum().item(),
                    100 * ((h != 0) & (h.abs() < tiny)).sum().item() / nz.sum().item()]
        rows.append(row)
    return rows


def main():
    print(f"{EXP}:")
    runs = c.run_all(EXP, [c.Spec(s.label, s.name, (f"--train.steps={STEPS}", *s.overrides)) for s in SPECS])
    scale = [r["loss_scale"] for r in runs[SCALED][0]["metrics"] if "loss_scale" in r][-1]
    layers = per_layer_underflow(runs[REF][0]["dir"], [1.0, scale])
    c.save_record(EXP, TITLE, {"steps": STEPS}, runs, summarise, extra={"per_layer": {"scale": scale,
                                                                                        "rows": layers}})
    c.write_outputs(sys.modules[__name__])


def table(record: dict) -> str:
    col = {k: c.by_label(record, k) for k in ("val_loss", "train_loss", "weight_grad_lost_pct", "act_grad_lost_pct",
                                              "skipped_steps")}
    rows = [[lab, c.cell(col["val_loss"][lab]), c.delta_cell(col["val_loss"][lab], col["val_loss"][REF]),
             c.cell(col["train_loss"][lab]), c.cell(col["weight_grad_lost_pct"][lab], 4),
             c.cell(col["act_grad_lost_pct"][lab], 3), c.cell(col["skipped_steps"][lab], 0)]
            for lab in record["labels"]]
    header = ["run", "final val loss", "Δ vs fp32", "final train loss", "% weight grads flushed+subnormal",
              "% activation grads lost", "skipped steps"]
    pl = record["per_layer"]
    s = f"{pl['scale']:g}"
    layer_rows = [[r[0]] + [f"{v:.3f}" for v in r[1:]] for r in pl["rows"]]
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n"
            "Telemetry columns: mean over each run's telemetry steps (every 10 steps), then mean ± std over seeds; "
            "`n/a` where the mode has no fp16 gradients. Activation gradients lost: the fraction of sampled "
            "activation-gradient elements (block outputs, head input, logits) that are zero in fp16 where a "
            "well-scaled backward carries gradient (`act_grad_lost_frac`, docs/precision.md).\n\n"
            f"Per weight matrix, on one batch, gradients of seed {record['seeds'][0]}'s trained fp32 model: % of "
            f"nonzero elements flushed to zero / made subnormal when stored in fp16 at loss scale S=1 and S={s} (the "
            "scaled run's final scale).\n\n" +
            c.markdown_table(["layer", "flushed % (S=1)", "subnormal % (S=1)", f"flushed % (S={s})",
                              f"subnormal % (S={s})"], layer_rows) + "\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (a, b) = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        c.band(a, record, lab, "loss", f"C{i}")
        c.band(b, record, lab, "act_grad_lost_frac", f"C{i}", "-", f"{lab}: activation grads lost")
        c.band(b, record, lab, "weight_grad_lost_frac", f"C{i}", ":", f"{lab}: weight grads flushed+subnormal")
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss (mean of seeds, min-max band)")
    b.set(xlabel="step", ylabel="fraction of sampled gradient elements", title="fp16 gradient loss")
    a.legend()
    b.legend(fontsize=7)
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
