"""Experiment 2: pure bf16 training — no compensation vs stochastic rounding vs Kahan vs bf16-mixed.

Claims: storing weights in bf16 loses updates smaller than half an ulp, which hurts late in
training when the LR is small (Collage, Yu et al. 2024); stochastic rounding ("Revisiting
BFloat16 Training", Zamirai et al. 2020) or Kahan-compensated summation recovers most of the
gap to fp32 master weights ("pure bfloat16 is enough" with the right rounding).
Measured: lost-update fraction ||(w_after - w_before) - u|| / ||u|| from telemetry, and loss.
"""

from __future__ import annotations

from _common import figure, final_val, run, smooth, write_table

EXP = "bf16_pure"
CONFIGS = {
    "bf16-mixed (fp32 master)": ("--precision.mode=bf16-mixed",),
    "bf16-pure, round-to-nearest": ("--precision.mode=bf16-pure",),
    "bf16-pure + stochastic rounding": ("--precision.mode=bf16-pure", "--precision.stochastic_rounding=true"),
    "bf16-pure + Kahan": ("--precision.mode=bf16-pure", "--precision.kahan=true"),
}


def main():
    print(f"{EXP}:")
    runs = {label: run(EXP, label.split(" (")[0].replace(" ", "_").replace(",", "").replace("+", "plus"), *o)
            for label, o in CONFIGS.items()}
    ref = final_val(runs["bf16-mixed (fp32 master)"])
    rows = []
    for label, recs in runs.items():
        lost = [r["lost_update_frac"] for r in recs if "lost_update_frac" in r]
        late = lost[len(lost) // 2:]
        rows.append([label, recs[-1]["loss"], final_val(recs), final_val(recs) - ref,
                     sum(lost) / len(lost) if lost else "n/a", sum(late) / len(late) if late else "n/a"])
    write_table(EXP, "Pure bf16: lost updates and loss (300 steps, d128 x 4 layers, lr 3e-3 cosine to 3e-4)",
                ["run", "final train loss", "final val loss", "val gap vs bf16-mixed", "mean lost-update frac",
                 "mean lost-update frac, 2nd half"], rows)
    fig, (a, b), save = figure(EXP, 2)
    for i, (label, recs) in enumerate(runs.items()):
        a.plot([r["step"] for r in recs], smooth([r["loss"] for r in recs]), label=label, color=f'C{i}')
        tele = [r for r in recs if "lost_update_frac" in r]
        if tele:
            b.plot([r["step"] for r in tele], [r["lost_update_frac"] for r in tele], label=label, color=f'C{i}')
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss")
    b.set(xlabel="step", ylabel="||lost|| / ||intended update||", title="lost-update fraction")
    a.legend()
    b.legend()
    save()


if __name__ == "__main__":
    main()
