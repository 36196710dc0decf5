"""Continual pre-training experiments 6 and 7: replay, and optimizer state at the boundary.

Experiment 6 (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train
LLMs"): claim — LR re-warming + re-decaying plus a small replay of the old data matches
retraining from scratch on A ∪ B with the same compute, on both domains.
Set-up: stage A (code, STEPS steps, cosine 3e-3), stage B (Shakespeare, STEPS steps, re-warm 10
steps to 3e-3, cosine re-decay) with replay {0, 5, 25}% of every batch from A, against a single
2*STEPS-step run on a 50/50 mixture of A and B (same tokens, same schedule shape). The A -> B runs
use a BPE trained on A; the retrain run trains its own BPE on A ∪ B, so it is compared in bits per
byte, and a second retrain run with A's BPE compares in both units.
Experiment 7: the same A -> B run (no replay) with AdamW's state kept vs reset at the boundary.
"""

from __future__ import annotations

import sys

import _common as c
from _cpt import A, B, a_tokenizer, stage, stages, summarise

EXP, EXP_STATE = "cpt_replay", "cpt_optimizer_state"
STEPS = 80
B_SCHED = "{name: cosine, warmup_steps: 10}"
REPLAYS = (0.0, 0.05, 0.25)
JOINT = "retrain on A+B (50/50), own BPE on A+B"
JOINT_A_TOK = "retrain on A+B (50/50), A's BPE"
TITLE = f"Replay vs retraining from scratch ({STEPS} + {STEPS} steps, d128 x 4 layers)"
TITLE_STATE = f"AdamW state kept vs reset at the A -> B boundary (no replay, {STEPS} + {STEPS} steps)"


def two_stage(label: str, name: str, replay: float, state: str = "keep") -> c.Spec:
    return c.Spec(label, name, (stages(stage("A", STEPS, A), stage("B", STEPS, B, replay=replay, schedule=B_SCHED,
                                                                   optimizer_state=state)),),
                  base="continual_base.yaml")


def joint(label: str, name: str, *extra: str) -> c.Spec:
    mix = f"{A[:-1]}, weight: 0.5}}, {B[:-1]}, weight: 0.5}}"
    return c.Spec(label, name, (stages(stage("AB", 2 * STEPS, mix)), *extra), base="continual_base.yaml")


def main():
    print(f"{EXP}, {EXP_STATE}:")
    specs = [two_stage(f"A -> B, replay {100 * r:g}%", f"replay{r:g}", r) for r in REPLAYS]
    specs += [joint(JOINT, "joint"), joint(JOINT_A_TOK, "joint_atok", f"--data.tokenizer.path={a_tokenizer()}")]
    reset = two_stage("optimizer state reset", "reset", 0.0, "reset")
    runs = c.run_all(EXP, specs + [reset])
    settings = {"steps_per_stage": STEPS, "replays": list(REPLAYS), "base": "continual_base.yaml"}
    c.save_record(EXP, TITLE, settings, {s.label: runs[s.label] for s in specs}, summarise)
    state_runs = {"optimizer state keep": runs["A -> B, replay 0%"], "optimizer state reset": runs[reset.label]}
    c.save_record(EXP_STATE, TITLE_STATE, settings, state_runs, summarise)
    c.write_outputs(sys.modules[__name__])
    c.write_outputs(State)


def table(record: dict) -> str:
    loss = {k: c.by_label(record, f"val_loss/{k}") for k in ("code", "plays")}
    bpb = {k: c.by_label(record, f"val_bpb/{k}") for k in ("code", "plays")}
    mean_bpb = {lab: [(a + b) / 2 for a, b in zip(bpb["code"][lab], bpb["plays"][lab])] for lab in record["labels"]}
    replay = c.by_label(record, "replay")
    rows = []
    for lab in record["labels"]:
        rows.append([lab, c.cell(bpb["code"][lab]), c.cell(bpb["plays"][lab]), c.cell(mean_bpb[lab]),
                     c.delta_cell(mean_bpb[lab], mean_bpb[JOINT]), c.cell(loss["code"][lab]),
                     c.cell(loss["plays"][lab]),
                     f"{100 * c.mean_std(replay[lab])[0]:.2f}%" if any(v is not None for v in replay[lab]) else "-"])
    header = ["run", "A (code) bits/byte", "B (Shakespeare) bits/byte", "mean bits/byte",
              "Δ mean vs retrain (own BPE)", "A loss (nats/token)", "B loss (nats/token)", "realised replay"]
    return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\n"
            "Final validation numbers. Bits per byte is the comparable unit: the first retrain run's tokenizer "
            "differs from every other run's, so its nats/token are not comparable with theirs (the second "
            "retrain run shares A's tokenizer and is comparable in both units).\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, axes = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        for ax, dom in zip(axes, ("code", "plays")):
            c.band(ax, record, lab, f"val_bpb/{dom}", f"C{i}")
    for ax, t in zip(axes, ("code (A)", "Shakespeare (B)")):
        ax.axvline(record["settings"]["steps_per_stage"], color="k", linestyle=":", linewidth=1)
        ax.set(xlabel="step", ylabel="validation bits per byte", title=f"{t}: mean of seeds, min-max band")
    axes[1].legend(fontsize=7)
    c.save_figure(fig, path)


class State:
    """Experiment 7's table and plot (its record is results/cpt_optimizer_state.json)."""
    EXP = EXP_STATE

    @staticmethod
    def table(record: dict) -> str:
        steps = record["settings"]["steps_per_stage"]
        labels = record["labels"]
        first_b = {lab: [next(v for s, v in r["curves"]["val_loss/plays"] if s > steps)
                         for r in record["runs"] if r["label"] == lab] for lab in labels}
        a, b = c.by_label(record, "val_loss/code"), c.by_label(record, "val_loss/plays")
        ref = labels[0]
        rows = [[lab, c.cell(a[lab]), c.delta_cell(a[lab], a[ref]), c.cell(first_b[lab]),
                 c.delta_cell(first_b[lab], first_b[ref]), c.cell(b[lab]), c.delta_cell(b[lab], b[ref])]
                for lab in labels]
        header = ["run", "final A loss", "Δ vs keep", "B loss at first eval of stage B", "Δ vs keep", "final B loss",
                  "Δ vs keep"]
        return (f"# {record['title']}\n\n" + c.markdown_table(header, rows) + "\n\nValidation loss in nats/token "
                "(one tokenizer for all runs).\n\n" + c.provenance(record) + "\n")

    @staticmethod
    def plot(record: dict, path) -> None:
        fig, (ax,) = c.figure(1)
        for i, lab in enumerate(record["labels"]):
            for dom, ls in (("code", "--"), ("plays", "-")):
                c.band(ax, record, lab, f"val_loss/{dom}", f"C{i}", ls, f"{lab}: {dom}")
        ax.axvline(record["settings"]["steps_per_stage"], color="k", linestyle=":", linewidth=1)
        ax.set(xlabel="step", ylabel="validation loss", title="keep vs reset AdamW state at the boundary")
        ax.legend(fontsize=8)
        c.save_figure(fig, path)


if __name__ == "__main__":
    main()
