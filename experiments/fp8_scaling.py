"""Experiment 3: fp8 linears with current scaling, delayed scaling and no scaling, vs bf16.

Claim (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): e4m3 forward / e5m2
backward with per-tensor scaling trains to within noise of 16-bit; without scaling, values
outside the narrow fp8 range are lost. Delayed scaling (scale from an amax history)
matches current scaling when amaxes change slowly.
On this CPU the fp8 matmuls are exact emulation (fp8 values, fp32 accumulation), so this
measures numerics, not speed.
"""

from __future__ import annotations

from _common import figure, final_val, run, smooth, write_table

EXP = "fp8_scaling"
CONFIGS = {
    "bf16-mixed": ("--precision.mode=bf16-mixed",),
    "fp8, current scaling": ("--precision.mode=fp8", "--precision.fp8.scaling=current"),
    "fp8, delayed scaling (16)": ("--precision.mode=fp8", "--precision.fp8.scaling=delayed"),
    "fp8, no scaling": ("--precision.mode=fp8", "--precision.fp8.scaling=none"),
}
KEYS = ["fp8_input_underflow_frac", "fp8_weight_underflow_frac", "fp8_grad_underflow_frac",
        "fp8_grad_saturated_frac"]


def main():
    print(f"{EXP}:")
    runs = {label: run(EXP, label.replace(", ", "_").replace(" ", "_").replace("(", "").replace(")", ""), *o)
            for label, o in CONFIGS.items()}
    ref = final_val(runs["bf16-mixed"])
    rows = []
    for label, recs in runs.items():
        tele = [r for r in recs if KEYS[0] in r]
        means = [100 * sum(r[k] for r in tele) / len(tele) if tele else "n/a" for k in KEYS]
        rows.append([label, recs[-1]["loss"], final_val(recs), final_val(recs) - ref, *means])
    write_table(EXP, "fp8 e4m3/e5m2 linears: scaling strategies (300 steps, d128 x 4 layers)",
                ["run", "final train loss", "final val loss", "val gap vs bf16", "% input underflow",
                 "% weight underflow", "% grad underflow", "% grad saturated"], rows)
    fig, (a, b), save = figure(EXP, 2)
    for i, (label, recs) in enumerate(runs.items()):
        a.plot([r["step"] for r in recs], smooth([r["loss"] for r in recs]), label=label, color=f'C{i}')
        tele = [r for r in recs if KEYS[2] in r]
        if tele:
            b.plot([r["step"] for r in tele], [100 * r[KEYS[2]] for r in tele], label=label, color=f'C{i}')
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss")
    b.set(xlabel="step", ylabel="% of output-gradient elements", title="e5m2 gradient underflow")
    a.legend()
    b.legend()
    save()


if __name__ == "__main__":
    main()
