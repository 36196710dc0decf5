"""Experiment 4: ternary (BitNet b1.58) from scratch vs a 16-bit -> ternary transition.

Claim ("Continual Quantization-Aware Pre-Training", 16 -> 1.58-bit): starting in 16-bit and
switching to ternary QAT part-way beats ternary from scratch for the same total steps, and
keeping the optimizer state across the switch is at least as good as resetting it.
All runs: 400 steps; the 16-bit phase is bf16-mixed; ternary quantises weights (absmean)
and linear inputs (int8 per token) with a straight-through estimator.
"""

from __future__ import annotations

from _common import figure, final_val, run, write_table

EXP = "ternary_transition"
STEPS = 400


def switch(at: int, state: str = "keep") -> tuple[str, ...]:
    return (f"--train.steps={STEPS}", "--precision.mode=bf16-mixed",
            f"--precision.schedule=[{{at_step: {at}, mode: ternary, optimizer_state: {state}}}]")


CONFIGS = {
    "bf16-mixed throughout (reference)": (f"--train.steps={STEPS}", "--precision.mode=bf16-mixed"),
    "ternary from scratch": (f"--train.steps={STEPS}", "--precision.mode=ternary"),
    "bf16 -> ternary at 25%, keep state": switch(STEPS // 4),
    "bf16 -> ternary at 50%, keep state": switch(STEPS // 2),
    "bf16 -> ternary at 50%, reset state": switch(STEPS // 2, "reset"),
    "bf16 -> ternary at 75%, keep state": switch(3 * STEPS // 4),
}


def main():
    print(f"{EXP}:")
    runs = {}
    for i, (label, o) in enumerate(CONFIGS.items()):
        runs[label] = run(EXP, f"r{i}", "--eval.every=25", *o)
    rows = [[label, final_val(recs), recs[-1]["loss"]] for label, recs in runs.items()]
    write_table(EXP, f"Ternary from scratch vs 16-bit -> ternary ({STEPS} steps, d128 x 4 layers)",
                ["run", "final val loss", "final train loss"], rows)
    fig, (a,), save = figure(EXP, 1)
    for i, (label, recs) in enumerate(runs.items()):
        val = [r for r in recs if "val_loss" in r]
        a.plot([r["step"] for r in val], [r["val_loss"] for r in val], label=label, color=f'C{i}', marker=".")
    a.set(xlabel="step", ylabel="validation loss", title="ternary QAT: from scratch vs transition")
    a.legend(fontsize=8)
    save()


if __name__ == "__main__":
    main()
