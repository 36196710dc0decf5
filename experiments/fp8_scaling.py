"""Experiment 3: fp8 linears with current scaling, delayed scaling and no scaling, vs bf16.

Claim (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): e4m3 forward / e5m2
backward with per-tensor scaling trains to within noise of 16-bit; without scaling, values
outside the narrow fp8 range are lost. Delayed scaling (scale from an amax history)
matches current scaling when amaxes change slowly.
On this CPU the fp8 matmuls are exact emulation (fp8 values, fp32 accumulation), so this
measures numerics, not speed.
"""

from __future__ import annotations

import sys

import _common as c

EXP = "fp8_scaling"
STEPS = 100
REF = "bf16-mixed"
SPECS = [
    c.Spec(REF, "bf16", ("--precision.mode=bf16-mixed",)),
    c.Spec("fp8, current scaling", "fp8_current", ("--precision.mode=fp8", "--precision.fp8.scaling=current")),
    c.Spec("fp8, delayed scaling (16)", "fp8_delayed", ("--precision.mode=fp8", "--precision.fp8.scaling=delayed")),
    c.Spec("fp8, no scaling", "fp8_none", ("--precision.mode=fp8", "--precision.fp8.scaling=none")),
]
KEYS = ["fp8_input_underflow_frac", "fp8_weight_underflow_frac", "fp8_grad_underflow_frac", "fp8_grad_saturated_frac"]
TITLE = f"fp8 e4m3/e5m2 linears: scaling strategies ({STEPS} steps, d128 x 4 layers)"


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    final = {"val_loss": c.last(recs, "val_loss"), "train_loss": recs[-1]["loss"]}
    tele = [r for r in recs if KEYS[0] in r]
    for k in KEYS:
        final[k] = 100 * sum(r[k] for r in tele) / len(tele) if tele else None
    return final, {"loss": c.smooth(c.curve(recs, "loss")), KEYS[2]: c.curve(recs, KEYS[2])}


def main():
    print(f"{EXP}:")
    runs = c.run_all(EXP, [c.Spec(s.label, s.name, (f"--train.steps={STEPS}", *s.overrides)) for s in SPECS])
    c.save_record(EXP, TITLE, {"steps": STEPS}, runs, summarise)
    c.write_outputs(sys.modules[__name__])


def table(record: dict) -> str:
    val, train = c.by_label(record, "val_loss"), c.by_label(record, "train_loss")
    tele = {k: c.by_label(record, k) for k in KEYS}
    rows = []
    for lab in record["labels"]:
        rows.append([lab, c.cell(val[lab]), c.delta_cell(val[lab], val[REF]) if lab != REF else "-",
                     c.cell(train[lab])] + [c.cell(tele[k][lab], 4) for k in KEYS])
    header = ["run", "final val loss", "Δ vs bf16", "final train loss", "% input underflow", "% weight underflow",
              "% grad underflow", "% grad saturated"]
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\nTelemetry columns: mean over the "
            "run's telemetry steps of each seed, then mean ± std over seeds.\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (a, b) = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        c.band(a, record, lab, "loss", f"C{i}")
        c.band(b, record, lab, KEYS[2], f"C{i}")
    a.set(xlabel="step", ylabel="train loss (10-step mean)", title="loss (mean of seeds, min-max band)")
    b.set(xlabel="step", ylabel="fraction of output-gradient elements", title="e5m2 gradient underflow")
    a.legend()
    b.legend()
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
