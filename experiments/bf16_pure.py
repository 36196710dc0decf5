"""Experiment 2: pure bf16 training — no compensation vs stochastic rounding vs Kahan vs bf16-mixed.

Claims: storing weights in bf16 loses updates smaller than half an ulp, which hurts late in
training when the LR is small (Collage, Yu et al. 2024); stochastic rounding ("Revisiting
BFloat16 Training", Zamirai et al. 2020) or Kahan-compensated summation recovers most of the
gap to fp32 master weights ("pure bfloat16 is enough" with the right rounding).
Measured: the lost-update fractions of telemetry (docs/precision.md: ||Δ - u|| / ||u|| and
1 - <Δ, u> / ||u||², with Δ the move of the effective weight, w + c under Kahan), and loss.
"""

from __future__ import annotations

import sys

import _common as c

EXP = "bf16_pure"
STEPS = 120
REF = "bf16-mixed (fp32 master)"
SPECS = [
    c.Spec(REF, "bf16_mixed", ("--precision.mode=bf16-mixed",)),
    c.Spec("bf16-pure, round-to-nearest", "pure_rtn", ("--precision.mode=bf16-pure",)),
    c.Spec("bf16-pure + stochastic rounding", "pure_sr", ("--precision.mode=bf16-pure",
                                                          "--precision.stochastic_rounding=true")),
    c.Spec("bf16-pure + Kahan", "pure_kahan", ("--precision.mode=bf16-pure", "--precision.kahan=true")),
]
KEYS = ("lost_update_frac", "lost_update_along_frac")
TITLE = f"Pure bf16: lost updates and loss ({STEPS} steps, d128 x 4 layers, lr 3e-3 cosine to 3e-4)"


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    final = {"val_loss": c.last(recs, "val_loss"), "train_loss": recs[-1]["loss"]}
    curves = {"loss": c.smooth(c.curve(recs, "loss"))}
    for k in KEYS:
        vals = [r[k] for r in recs if k in r]
        late = vals[len(vals) // 2:]
        final[k] = sum(vals) / len(vals) if vals else None
        final[f"{k}_late"] = sum(late) / len(late) if late else None
        if vals:
            curves[k] = c.curve(recs, k)
    return final, curves


def main():
    print(f"{EXP}:")
    runs = c.run_all(EXP, [c.Spec(s.label, s.name, (f"--train.steps={STEPS}", *s.overrides)) for s in SPECS])
    c.save_record(EXP, TITLE, {"steps": STEPS}, runs, summarise)
    c.write_outputs(sys.modules[__name__])


def table(record: dict) -> str:
    keys = ["val_loss", "train_loss", *KEYS, *(f"{k}_late" for k in KEYS)]
    col = {k: c.by_label(record, k) for k in keys}
    rtn = "bf16-pure, round-to-nearest"
    rows = [[lab, c.cell(col["val_loss"][lab]), c.delta_cell(col["val_loss"][lab], col["val_loss"][REF]),
             c.delta_cell(col["val_loss"][lab], col["val_loss"][rtn]) if lab != REF else "-",
             c.cell(col["train_loss"][lab])] + [c.cell(col[k][lab]) for k in keys[2:]] for lab in record["labels"]]
    header = ["run", "final val loss", "Δ vs bf16-mixed", "Δ vs round-to-nearest", "final train loss",
              "lost-update frac", "lost-update along frac", "lost-update frac, 2nd half",
              "lost-update along frac, 2nd half"]
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n"
            "Lost-update columns: mean over each run's telemetry steps (every 10 steps), then mean ± std over "
            "seeds; `n/a` for bf16-mixed, whose fp32 master weights lose nothing to storage.\n\n" +
            c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (a, b) = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        c.band(a, record, lab, "loss", f"C{i}")
        c.band(b, record, lab, "lost_update_along_frac", f"C{i}")
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss (mean of seeds, min-max band)")
    b.set(xlabel="step", ylabel="1 - <Δ, u> / ||u||²", title="lost-update fraction along the update")
    a.legend()
    b.legend()
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
