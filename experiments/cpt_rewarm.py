"""Continual pre-training experiment 5: re-warming (Gupta et al. 2023, "Continual Pre-Training of
Large Language Models: How to (re)warm your model?").

Claim: when continuing on a new domain, re-warming the LR to a high maximum first *raises* the
loss (upstream and briefly downstream), but a higher max LR ends better on the new domain while
forgetting more of the old one; the warmup length matters little.
Set-up: per seed, pretrain on A (code, STEPS steps, cosine 3e-3 -> 3e-4), then continue on B
(Shakespeare, STEPS steps, cosine) from that checkpoint with warmup {0, 5%} x max LR
{3e-4, 3e-3}; A is evaluated throughout (weight 0 = validation only). One tokenizer for all runs.
"""

from __future__ import annotations

import sys

import _common as c
from _cpt import A, B, stage, stages, summarise

EXP = "cpt_rewarm"
STEPS = 80
LRS, WARMUPS = (3.0e-4, 3.0e-3), (0.0, 0.05)
TITLE = f"Re-warming: continue on Shakespeare from a code model ({STEPS} + {STEPS} steps, d128 x 4 layers)"


def main():
    print(f"{EXP}:")
    pre = c.Spec("pretrain A", "pretrain_A", (stages(stage("A", STEPS, A)),), base="continual_base.yaml")
    pre_runs = c.run_all(EXP, [pre])["pretrain A"]
    specs = []
    for lr in LRS:
        for frac in WARMUPS:
            warm = round(frac * STEPS)
            specs.append((f"max LR {lr:g}, warmup {100 * frac:g}% ({warm} steps)", f"lr{lr:g}_w{warm}", lr, warm))
    # Each seed's B runs start from that seed's pretrained model: one job list per seed.
    runs = {label: [] for label, *_ in specs}
    for seed, p in zip(c.SEEDS, pre_runs):
        jobs = [c.Spec(label, name, (stages(stage(
            "B", STEPS, f"{B}, {{name: code, source: {{kind: python-stdlib}}, weight: 0}}", init_from=str(p["dir"]),
            optim=f"{{lr: {lr}}}", schedule=f"{{name: cosine, warmup_steps: {warm}}}")),), base="continual_base.yaml")
            for label, name, lr, warm in specs]
        for label, per_seed in c.run_all(EXP, jobs, seeds=(seed,)).items():
            runs[label] += per_seed
    a_start = {p["seed"]: c.last(p["metrics"], "val_loss/code") for p in pre_runs}

    def summarise_b(run):
        final, curves = summarise(run)
        a = curves["val_loss/code"]
        peak_step, peak = max(a, key=lambda p: p[1])
        final.update({"a_start": a_start[run["seed"]], "a_rise_first": a[0][1] - a_start[run["seed"]],
                      "a_peak_rise": peak - a_start[run["seed"]], "a_peak_step": peak_step,
                      "a_rise_end": a[-1][1] - a_start[run["seed"]], "b_first": curves["val_loss/plays"][0][1]})
        return final, curves

    c.save_record(EXP, TITLE, {"steps_per_stage": STEPS, "lrs": list(LRS), "warmups": list(WARMUPS)}, runs,
                  summarise_b, extra={"a_start": [a_start[s] for s in c.SEEDS]})
    c.write_outputs(sys.modules[__name__])


def table(record: dict) -> str:
    keys = ["a_rise_first", "a_peak_rise", "a_rise_end", "b_first", "val_loss/plays"]
    cols = {k: c.by_label(record, k) for k in keys + ["a_peak_step"]}
    labels = record["labels"]
    rows = []
    for lab in labels:
        peak_steps = ", ".join(str(int(s)) for s in cols["a_peak_step"][lab])
        rows.append([lab] + [c.cell(cols[k][lab]) for k in keys[:3]] + [peak_steps] +
                    [c.cell(cols[k][lab]) for k in keys[3:]])
    header = ["run", "A loss rise at first eval of B", "A peak rise", "A loss rise, end", "A peak at step (per seed)",
              "B loss, first eval", "B loss, end"]
    # The two questions of the claim, each under the noise rule.
    n = len(record["settings"]["warmups"])
    lo, hi = labels[:n], labels[n:]
    compare = []
    for a_lab, b_lab in zip(lo, hi):
        compare.append([f"{b_lab} vs {a_lab}", c.delta_cell(cols["val_loss/plays"][b_lab], cols["val_loss/plays"][a_lab]),
                        c.delta_cell(cols["a_rise_end"][b_lab], cols["a_rise_end"][a_lab])])
    for group in (lo, hi):
        compare.append([f"{group[-1]} vs {group[0]}",
                        c.delta_cell(cols["val_loss/plays"][group[-1]], cols["val_loss/plays"][group[0]]),
                        c.delta_cell(cols["a_rise_end"][group[-1]], cols["a_rise_end"][group[0]])])
    a0 = c.cell(record["a_start"])
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n## Differences\n\n" +
            c.markdown_table(["comparison", "Δ B loss, end", "Δ A loss rise, end"], compare) +
            f"\n\nValidation loss in nats/token (one tokenizer for all runs). A (code) validation loss at the end of "
            f"pretraining, where every B run starts: {a0}.\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, (ax_a, ax_b) = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        ls = "-" if "0.003" in lab else "--"
        c.band(ax_a, record, lab, "val_loss/code", f"C{i}", ls)
        c.band(ax_b, record, lab, "val_loss/plays", f"C{i}", ls)
    ax_a.set(xlabel="step of stage B", ylabel="validation loss", title="upstream: code (A), mean of seeds")
    ax_b.set(xlabel="step of stage B", ylabel="validation loss", title="downstream: Shakespeare (B), mean of seeds")
    ax_b.legend(fontsize=7)
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
