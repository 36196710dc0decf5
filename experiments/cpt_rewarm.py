"""Continual pre-training experiment 1: re-warming (Gupta et al. 2023, "Continual Pre-Training of
Large Language Models: How to (re)warm your model?").

Claim: when continuing on a new domain, re-warming the LR to a high maximum first *raises* the
loss (upstream and briefly downstream), but a higher max LR ends better on the new domain while
forgetting more of the old one; the warmup length matters little.
Set-up: pretrain on A (code, 200 steps, cosine 3e-3 -> 3e-4), then continue on B (Shakespeare,
200 steps, cosine) from that checkpoint with warmup {0, 1%, 5%} x max LR {3e-4, 3e-3}; A is
evaluated throughout (weight 0 = validation only).
"""

from __future__ import annotations

from _common import HERE, figure, run, write_table
from _cpt import A, B, stage, stages, val

EXP = "cpt_rewarm"
STEPS = 200


def main():
    print(f"{EXP}:")
    pre = run(EXP, "pretrain_A", stages(stage("A", STEPS, A)), base="continual_base.yaml")
    a_start = val(pre, "code")[-1][1]  # A's validation loss when stage B begins
    src = HERE / "runs" / EXP / "pretrain_A"
    runs = {}
    for lr in (3.0e-4, 3.0e-3):
        for frac in (0.0, 0.01, 0.05):
            warm = round(frac * STEPS)
            label = f"max LR {lr:g}, warmup {100 * frac:g}% ({warm} steps)"
            name = f"lr{lr:g}_w{warm}"
            runs[label] = run(EXP, name, stages(stage(
                "B", STEPS, f"{B}, {{name: code, source: {{kind: python-stdlib}}, weight: 0}}",
                init_from=str(src), optim=f"{{lr: {lr}}}", schedule=f"{{name: cosine, warmup_steps: {warm}}}")),
                base="continual_base.yaml")
            runs[label] = (runs[label], name)
    rows = []
    for label, (recs, name) in runs.items():
        a, b = val(recs, "code"), val(recs, "plays")
        peak_step, peak = max(a, key=lambda p: p[1])
        rows.append([label, a[0][1] - a_start, peak - a_start, peak_step, a[-1][1] - a_start, b[0][1], b[-1][1]])
    write_table(EXP, f"Re-warming: continue on Shakespeare from a code model ({STEPS} + {STEPS} steps)",
                ["run", "A loss rise at step 20 of B", "A peak rise", "A peak at step", "A loss rise, end",
                 "B loss, step 20", "B loss, end"], rows,
                f"A (code) validation loss at the end of pretraining, where every B run starts: {a_start:.4f}.")
    fig, (ax_a, ax_b), save = figure(EXP, 2)
    for i, (label, (recs, _)) in enumerate(runs.items()):
        for ax, dom in ((ax_a, "code"), (ax_b, "plays")):
            pts = val(recs, dom)
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, color=f"C{i}",
                    linestyle="-" if "0.003" in label else "--")
    ax_a.set(xlabel="step of stage B", ylabel="validation loss", title="upstream: code (A)")
    ax_b.set(xlabel="step of stage B", ylabel="validation loss", title="downstream: Shakespeare (B)")
    ax_b.legend(fontsize=7)
    save()


if __name__ == "__main__":
    main()
