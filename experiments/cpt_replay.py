"""Continual pre-training experiments 2 and 3: replay, and optimizer state at the boundary.

Experiment 2 (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train
LLMs"): claim — LR re-warming + re-decaying plus a small replay of the old data matches
retraining from scratch on A ∪ B with the same compute, on both domains.
Set-up: stage A (code, 200 steps, cosine 3e-3), stage B (Shakespeare, 200 steps, re-warm 10
steps to 3e-3, cosine re-decay) with replay {0, 1, 5, 25}% of every batch from A, against a
single 400-step run on a 50/50 mixture of A and B (same tokens, same schedule shape).
Experiment 3: the same A -> B run (no replay) with AdamW's state kept vs reset at the boundary.
"""

from __future__ import annotations

from _common import figure, run, write_table
from _cpt import A, B, stage, stages, val

STEPS = 200
B_SCHED = "{name: cosine, warmup_steps: 10}"


def two_stage(exp: str, name: str, replay: float, state: str = "keep"):
    return run(exp, name, stages(stage("A", STEPS, A),
                                 stage("B", STEPS, B, replay=replay, schedule=B_SCHED, optimizer_state=state)),
               base="continual_base.yaml")


def replay_experiment():
    exp = "cpt_replay"
    print(f"{exp}:")
    runs = {f"A -> B, replay {100 * r:g}%": two_stage(exp, f"replay{r:g}", r) for r in (0.0, 0.01, 0.05, 0.25)}
    runs["retrain on A+B (50/50) from scratch"] = run(
        exp, "joint", stages(stage("AB", 2 * STEPS, f"{A[:-1]}, weight: 0.5}}, {B[:-1]}, weight: 0.5}}")),
        base="continual_base.yaml")
    rows = []
    for label, recs in runs.items():
        a, b = val(recs, "code")[-1][1], val(recs, "plays")[-1][1]
        real = [r["replay"] for r in recs if r.get("stage") == 1 and "replay" in r]
        rows.append([label, a, b, (a + b) / 2, f"{100 * sum(real) / len(real):.2f}%" if real else "-"])
    write_table(exp, f"Replay vs retraining from scratch ({STEPS} + {STEPS} steps)",
                ["run", "final val loss A (code)", "final val loss B (Shakespeare)", "mean", "realised replay"],
                rows)
    fig, (ax_a, ax_b), save = figure(exp, 2)
    for i, (label, recs) in enumerate(runs.items()):
        for ax, dom in ((ax_a, "code"), (ax_b, "plays")):
            pts = val(recs, dom)
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, color=f"C{i}")
    for ax, t in ((ax_a, "code (A)"), (ax_b, "Shakespeare (B)")):
        ax.axvline(STEPS, color="k", linestyle=":", linewidth=1)
        ax.set(xlabel="step", ylabel="validation loss", title=t)
    ax_b.legend(fontsize=7)
    save()


def optimizer_state_experiment():
    exp = "cpt_optimizer_state"
    print(f"{exp}:")
    runs = {f"optimizer state {s}": two_stage(exp, s, 0.0, s) for s in ("keep", "reset")}
    rows = []
    for label, recs in runs.items():
        b = val(recs, "plays")
        a = val(recs, "code")
        b_first = [v for s, v in b if s > STEPS][0]
        rows.append([label, a[-1][1], b_first, b[-1][1]])
    write_table(exp, "AdamW state kept vs reset at the A -> B boundary (no replay)",
                ["run", "final val loss A", "B loss at first eval of stage B", "final val loss B"], rows)
    fig, (ax,), save = figure(exp, 1)
    for i, (label, recs) in enumerate(runs.items()):
        for dom, ls in (("code", "--"), ("plays", "-")):
            pts = val(recs, dom)
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"{label}: {dom}", color=f"C{i}", linestyle=ls)
    ax.axvline(STEPS, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="step", ylabel="validation loss", title="keep vs reset AdamW state at the boundary")
    ax.legend(fontsize=8)
    save()


if __name__ == "__main__":
    replay_experiment()
    optimizer_state_experiment()
