"""Experiment 4: ternary (BitNet b1.58) from scratch vs a 16-bit -> ternary transition.

Claim ("Continual Quantization-Aware Pre-Training", 16 -> 1.58-bit): starting in 16-bit and
switching to ternary QAT part-way beats ternary from scratch for the same total steps, and
keeping the optimizer state across the switch is at least as good as resetting it.
All runs: STEPS steps; the 16-bit phase is bf16-mixed; ternary quantises weights (absmean)
and linear inputs (int8 per token) with a straight-through estimator.
"""

from __future__ import annotations

import sys

import _common as c

EXP = "ternary_transition"
STEPS = 120
REF, SCRATCH = "bf16-mixed throughout (reference)", "ternary from scratch"
TITLE = f"Ternary from scratch vs 16-bit -> ternary ({STEPS} steps, d128 x 4 layers)"


def switch(at: int, state: str = "keep") -> tuple[str, ...]:
    return (f"--train.steps={STEPS}", "--precision.mode=bf16-mixed",
            f"--precision.schedule=[{{at_step: {at}, mode: ternary, optimizer_state: {state}}}]")


SPECS = [
    c.Spec(REF, "bf16", (f"--train.steps={STEPS}", "--precision.mode=bf16-mixed")),
    c.Spec(SCRATCH, "ternary", (f"--train.steps={STEPS}", "--precision.mode=ternary")),
    c.Spec("bf16 -> ternary at 50%, keep state", "switch50_keep", switch(STEPS // 2)),
    c.Spec("bf16 -> ternary at 50%, reset state", "switch50_reset", switch(STEPS // 2, "reset")),
]


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    return ({"val_loss": c.last(recs, "val_loss"), "train_loss": recs[-1]["loss"]},
            {"val_loss": c.curve(recs, "val_loss")})


def main():
    print(f"{EXP}:")
    runs = c.run_all(EXP, [c.Spec(s.label, s.name, ("--eval.every=20", *s.overrides)) for s in SPECS])
    c.save_record(EXP, TITLE, {"steps": STEPS}, runs, summarise)
    c.write_outputs(sys.modules[__name__])


def table(record: dict) -> str:
    val, train = c.by_label(record, "val_loss"), c.by_label(record, "train_loss")
    keep50 = "bf16 -> ternary at 50%, keep state"
    rows = [[lab, c.cell(val[lab]), c.delta_cell(val[lab], val[SCRATCH]) if lab != SCRATCH else "-",
             c.delta_cell(val[lab], val[REF]) if lab != REF else "-", c.cell(train[lab])] for lab in record["labels"]]
    header = ["run", "final val loss", "Δ vs ternary from scratch", "Δ vs bf16 throughout", "final train loss"]
    reset = "bf16 -> ternary at 50%, reset state"
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n"
            f"Reset vs keep at 50%: {c.delta_cell(val[reset], val[keep50])} in final validation loss.\n\n" +
            c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (ax,) = c.figure(1)
    for i, lab in enumerate(record["labels"]):
        c.band(ax, record, lab, "val_loss", f"C{i}")
    ax.set(xlabel="step", ylabel="validation loss", title="ternary QAT: from scratch vs transition (mean of seeds)")
    ax.legend(fontsize=8)
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
