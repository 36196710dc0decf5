"""Preference experiment 10: how much SFT before DPO, and DPO vs SimPO vs ORPO, at a fixed step budget.

Questions:
  (A) SFT -> DPO on the built-in arithmetic preferences (chosen = the right sum, rejected = a plausible
      wrong one) with 0%, 10% and 50% of TOTAL_STEPS spent on SFT and the rest on DPO: does a small
      SFT budget before DPO do best, as the seed paper reports ("<10% SFT before DPO")?
  (B) DPO (loss sigmoid) vs SimPO (simpo) vs ORPO (orpo) for the same preference steps from the same
      start, the 10% SFT model, so that only the loss differs. DPO and SimPO are run from an SFT model
      in their papers; ORPO's paper runs it from the base with its NLL term doing the SFT, and here it
      gets the same 20 SFT steps first (its NLL term still trains on the chosen answers). The shared
      start also reuses (A)'s 10% DPO runs.
Set-up: experiment 8's cached base (sft_arithmetic.py: 2 layers, d128, a digit-per-token BPE, 120
steps on the CPython standard library) and one staged recipe per run: `sft` then `dpo`, the first
stage with `init_from` the base; the 0% arm is a single `dpo` stage from the base. The seed sets the
data order and the generator seed of the problems (so each seed has its own validation problems,
shared by every arm of that seed). Measured at every evaluation and at the end: exact_match (greedy
answers to held-out problems) and the dpo stage's val_rewards/accuracies and margins; after training,
in this process, the policy's preference accuracy on the same validation pairs (the share where the
final model gives the right answer a higher summed log-probability than the wrong one), the one
ranking defined alike for DPO (whose reward is relative to its reference), SimPO and ORPO (whose
rewards are per-token log-probabilities of the policy), and for the models the runs start from.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import _common as c
import sft_arithmetic as arith

EXP = "dpo_sft_budget"
TOTAL_STEPS = 200          # SFT + preference steps of every run: 35-105 s each, two at a time (README §10)
BATCH = 16                 # packed 64-token rows: ~48 SFT problems or 16 preference pairs per step
SEQ_LEN = 64
SFT_LR = 3e-3              # experiment 8's SFT lr (constant after warmup)
PREF_LR = 3e-4             # pilots: 1e-4 barely moved the reward accuracy, 1e-3 no better than 3e-4 (README §10)
WARMUP = 10
EVAL_EVERY = 100           # and at each stage's end; an evaluation costs ~4 s (greedy answers), 10-20 steps
VAL_PAIRS = 400            # validation pairs for the reward metrics; every one is scored at every evaluation
EM_PROBLEMS = 100          # held-out problems answered greedily for exact_match
ARITH = {"ops": ["add"], "min_digits": 1, "max_digits": 2, "format": "plain", "train_count": 5000,
         "val_count": VAL_PAIRS}
# (label, run name, share of TOTAL_STEPS spent on SFT, preference loss)
ARMS = (("DPO, 0% SFT", "dpo-sft0", 0.0, "sigmoid"),
        ("DPO, 10% SFT", "dpo-sft10", 0.1, "sigmoid"),
        ("DPO, 50% SFT", "dpo-sft50", 0.5, "sigmoid"),
        ("SimPO, 10% SFT", "simpo-sft10", 0.1, "simpo"),
        ("ORPO, 10% SFT", "orpo-sft10", 0.1, "orpo"))
WRONG_KINDS = ("length", "ones", "higher")
BUDGET_ARMS = ARMS[:3]     # question (A)
LOSS_ARMS = (ARMS[1], ARMS[3], ARMS[4])  # question (B): the same 10% SFT start
TITLE = (f"SFT budget before DPO, and DPO vs SimPO vs ORPO, on addition preferences (1..2-digit operands): "
         f"{TOTAL_STEPS} steps in all from experiment 8's code model (d128 x 2 layers)")


def recipe(share: float, loss: str, base_dir) -> dict:
    """The staged recipe of one arm: sft (share of the steps) then dpo, or dpo alone from the base."""
    sft_steps = round(share * TOTAL_STEPS)
    pref = {"name": "pref", "kind": "dpo", "steps": TOTAL_STEPS - sft_steps, "optim": {"lr": PREF_LR},
            "dpo": {"loss": loss}}
    stages = [{"name": "chat", "kind": "sft", "steps": sft_steps}, pref] if sft_steps else [pref]
    stages[0]["init_from"] = str(base_dir)
    return {"name": "exp", "out_dir": str(c.HERE / "runs"), "seed": 1, "threads": 1,
            "data": {"seq_len": SEQ_LEN}, "train": {"batch_size": BATCH}, "optim": {"lr": SFT_LR},
            "schedule": {"name": "constant", "warmup_steps": WARMUP},
            "precision": {"mode": "fp32", "telemetry_every": 0},  # no bf16 emulation cost on this CPU
            "eval": {"every": EVAL_EVERY, "batches": math.ceil(VAL_PAIRS / BATCH)},
            "checkpoint": {"every": 0, "keep_last": 1}, "log": {"progress": "none"},
            "sft": {"data": [{"kind": "arithmetic"}], "arithmetic": dict(ARITH), "eval_generate": EM_PROBLEMS,
                    "eval_max_new_tokens": ARITH["max_digits"] + 2},
            "dpo": {"data": [{"kind": "arithmetic"}], "arithmetic": dict(ARITH), "eval_generate": EM_PROBLEMS,
                    "eval_max_new_tokens": ARITH["max_digits"] + 2},
            "stages": stages}


def spec(arm: tuple, seed: int, base_dir) -> c.Spec:
    label, name, share, loss = arm
    path = c.HERE / "runs" / EXP / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(share, loss, base_dir), sort_keys=False))
    return c.Spec(label, name, (f"--sft.arithmetic.seed={seed}", f"--dpo.arithmetic.seed={seed}"), base=str(path))


def wrong_kind(right: int, wrong: int) -> str:
    """How the built-in rejected answer differs from the right one (stagewise.data.preference.wrong_answer):
    in length (mostly the sum without its carries, which drops a final carry), in the last digit only
    (mostly the answer one off), or in a higher digit."""
    a, b = str(right), str(wrong)
    if len(a) != len(b):
        return "length"
    return "ones" if a[:-1] == b[:-1] else "higher"


def policy_preference(model_dir, seed: int, cache: dict) -> dict:
    """Share of the seed's validation pairs whose chosen (right) answer the model gives a higher summed
    log-probability than the rejected one, over all pairs and per WRONG_KINDS: the stage's own encoding
    and log-probs, no reference. The sft stages of one seed end in the same weights in every arm, so
    scores are cached by weights."""
    import hashlib

    import torch

    from stagewise import rundir
    from stagewise.config.post_training import ArithmeticConfig, DPOConfig, PreferenceSourceConfig
    from stagewise.data import Tokenizer
    from stagewise.data.preference import load_preference_data
    from stagewise.data.preference_batches import padded_batch
    from stagewise.model import Transformer
    from stagewise.objectives.preference import sequence_logps

    mcfg, state, files, _ = rundir.load_init_source(model_dir)
    weights = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    if (weights, seed) in cache:
        return cache[weights, seed]
    model = Transformer(mcfg)
    rundir.load_weights(model, state, str(model_dir))
    model.eval()
    tok = Tokenizer.load(Path(files) / "tokenizer.json")
    arithmetic = ArithmeticConfig(**{**ARITH, "train_count": 1, "seed": seed})
    dpo = DPOConfig(data=[PreferenceSourceConfig(kind="arithmetic")], arithmetic=arithmetic)
    val = load_preference_data(dpo, tok, SEQ_LEN, log=lambda m: None).val
    wins = []
    with torch.no_grad():
        for k in range(0, len(val), 64):
            lp = sequence_logps(model, padded_batch(val[k:k + 64], SEQ_LEN, tok.eos_id))[0].reshape(-1, 2)
            wins += (lp[:, 0] > lp[:, 1]).tolist()
    kinds = [wrong_kind(int(u.extra["answer"]), u.extra["wrong"]) for u in val]
    out = {"all": sum(wins) / len(wins)}
    for kind in WRONG_KINDS:
        mine = [w for w, k in zip(wins, kinds) if k == kind]
        out[kind], out[f"{kind}_pairs"] = (sum(mine) / len(mine) if mine else None), len(mine)
    cache[weights, seed] = out
    return out


def train_and_score(spec: c.Spec, seed: int, base_dir, cache: dict) -> dict:
    """One run, then the policy preference of the model its preference stage started from and of its
    final model (in this worker thread, so scoring overlaps the other worker's training)."""
    run = c._train(EXP, spec, seed)
    start = run["dir"] / "stages" / "chat"
    run["pref_start"] = policy_preference(start if start.is_dir() else base_dir, seed, cache)
    run["pref_final"] = policy_preference(run["dir"] / "final", seed, cache)
    return run


def main():
    print(f"{EXP}:")
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    tok = arith.digit_tokenizer()
    base = arith.base_run(tok["sha256"])
    import torch

    torch.set_num_threads(1)  # scoring runs in the worker threads, one core each like the runs
    jobs = [(spec(arm, seed, base["dir"]), seed) for arm in ARMS for seed in c.SEEDS]
    cache: dict = {}
    with ThreadPoolExecutor(c.WORKERS) as pool:
        done = list(pool.map(lambda job: train_and_score(*job, base["dir"], cache), jobs))
    runs = {arm[0]: [r for r in done if r["label"] == arm[0]] for arm in ARMS}
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    settings = {"total_steps": TOTAL_STEPS, "arms": [{"label": l, "name": n, "sft_share": s, "loss": lo,
                                                      "sft_steps": round(s * TOTAL_STEPS),
                                                      "pref_steps": TOTAL_STEPS - round(s * TOTAL_STEPS)}
                                                     for l, n, s, lo in ARMS],
                "budget_arms": [a[0] for a in BUDGET_ARMS], "loss_arms": [a[0] for a in LOSS_ARMS],
                "batch": BATCH, "seq_len": SEQ_LEN, "sft_lr": SFT_LR, "pref_lr": PREF_LR, "schedule": "constant",
                "warmup_steps": WARMUP, "eval_every": EVAL_EVERY, "val_pairs": VAL_PAIRS, "em_problems": EM_PROBLEMS,
                "arithmetic": ARITH, "beta": {"sigmoid": 0.1, "simpo": 2.0, "orpo": 0.1}, "simpo_gamma": 1.0,
                "base_steps": arith.BASE_STEPS, "precision": "fp32"}
    extra = {"base_run": {"wall_s": base["wall_s"], "cached": base["cached"]},
             "wall_total_s": round(time.perf_counter() - t0, 1),
             "cpu_total_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
             # the 2 cores are shared: a load above 2 at the start or end means the wall time includes waiting
             "load_average_1min": {"start": load0, "end": round(os.getloadavg()[0], 2)}}
    c.save_record(EXP, TITLE, settings, runs, summarise, extra)
    c.write_outputs(sys.modules[__name__])


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    sft_evals = [r for r in recs if r.get("stage") == 0 and "exact_match" in r and "val_rewards/accuracies" not in r]
    final = {"exact_match": c.last(recs, "exact_match"), "reward_acc": c.last(recs, "val_rewards/accuracies"),
             "reward_margin": c.last(recs, "val_rewards/margins"), "pref_val_loss": c.last(recs, "val_loss"),
             "sft_val_loss": c.last(recs, "val_loss/chat") if sft_evals else None,
             "sft_val_loss_start": sft_evals[-1]["val_loss"] if sft_evals else None,
             "sft_exact_match": sft_evals[-1]["exact_match"] if sft_evals else None,
             "policy_pref_start": run["pref_start"]["all"], "policy_pref_final": run["pref_final"]["all"],
             **{f"policy_pref_{when}_{k}": run[f"pref_{when}"][k] for when in ("start", "final")
                for k in WRONG_KINDS},
             **{f"pairs_{k}": run["pref_final"][f"{k}_pairs"] for k in WRONG_KINDS}}
    keys = ("exact_match", "val_rewards/accuracies", "val_rewards/margins", "val_loss/chat")
    return final, {k: c.curve(recs, k) for k in keys}


# ------------------------------------------------------------------ table and plot (from the record alone)

COLUMNS = (("exact_match", "exact match %", 100, 1), ("reward_acc", "val reward accuracy", 1, 3),
           ("policy_pref_final", "policy prefers chosen", 1, 3), ("reward_margin", "val reward margin", 1, 3),
           ("sft_val_loss", "SFT val loss at the end", 1, 2))


def _vals(record: dict, key: str, scale: float = 1) -> dict[str, list]:
    return {lab: [None if v is None else scale * v for v in vals] for lab, vals in c.by_label(record, key).items()}


def _delta(values: list, reference: list, digits: int) -> str:
    return c.delta_cell(values, reference, digits) if c.paired(values, reference) else "n/a"


def _section(record: dict, arms: list[str], pairs: list[tuple[str, str]]) -> str:
    rows = []
    steps = {a["label"]: a for a in record["settings"]["arms"]}
    chance = {lab: [0.5] * len(v) for lab, v in _vals(record, "reward_acc").items()}
    start, sft_start = _vals(record, "policy_pref_start"), _vals(record, "sft_val_loss_start")
    for lab in arms:
        a = steps[lab]
        cells = [c.cell(_vals(record, k, sc)[lab], d) for k, _, sc, d in COLUMNS]
        rows.append([lab, f"{a['sft_steps']} + {a['pref_steps']}", cells[0], cells[1],
                     c.delta_cell(_vals(record, "reward_acc")[lab], chance[lab]),
                     f"{c.cell(start[lab])} → {cells[2]}", cells[3],
                     "n/a" if not a["sft_steps"] else f"{c.cell(sft_start[lab], 2)} → {cells[4]}"])
    main = c.markdown_table(["arm", "SFT + preference steps", "exact match %", "val reward accuracy",
                             "reward accuracy − 0.5", "policy prefers chosen (start → end)", "val reward margin",
                             "SFT val loss (end of SFT → end)"], rows)
    drows = []
    for a, b in pairs:
        drows.append([f"{a} − {b}", *(_delta(_vals(record, k, sc)[a], _vals(record, k, sc)[b], dg)
                                      for k, _, sc, dg in COLUMNS if k != "reward_margin")])
    deltas = c.markdown_table(["paired difference (same seed: same problems, data order)", "exact match (points)",
                               "val reward accuracy", "policy prefers chosen", "SFT val loss at the end"], drows)
    return f"{main}\n\n{deltas}"


def table(record: dict) -> str:
    s, m, load = record["settings"], record["machine"], record["load_average_1min"]
    budget = _section(record, s["budget_arms"], [(s["budget_arms"][1], s["budget_arms"][0]),
                                                 (s["budget_arms"][2], s["budget_arms"][0]),
                                                 (s["budget_arms"][1], s["budget_arms"][2])])
    la = s["loss_arms"]
    losses = _section(record, la, [(la[1], la[0]), (la[2], la[0]), (la[2], la[1])])
    raw = []
    order = [a["label"] for a in s["arms"]]
    for r in sorted(record["runs"], key=lambda r: (order.index(r["label"]), r["seed"])):
        f = r["final"]
        sft_em = "—" if f["sft_exact_match"] is None else f"{100 * f['sft_exact_match']:.0f}"
        raw.append([r["label"], r["seed"], sft_em,
                    f"{100 * f['exact_match']:.0f}", f"{f['reward_acc']:.3f}", f"{f['reward_margin']:+.3f}",
                    f"{f['policy_pref_start']:.3f} → {f['policy_pref_final']:.3f}", f"{f['pref_val_loss']:.3f}",
                    "—" if f["sft_val_loss"] is None
                    else f"{f['sft_val_loss_start']:.2f} → {f['sft_val_loss']:.2f}",
                    f"{r['wall_s']:.0f}"])
    raw_table = c.markdown_table(["arm", "seed", "exact match % after SFT", "exact match % at end",
                                  "val reward accuracy", "val reward margin", "policy prefers chosen (start → end)",
                                  "preference val loss", "SFT val loss (end of SFT → end)", "wall s"], raw)
    kind_rows = []
    for lab in order:
        row = [lab]
        for k in WRONG_KINDS:
            n = _vals(record, f"pairs_{k}")[lab]
            row.append(f"{c.cell(_vals(record, f'policy_pref_start_{k}')[lab], 2)} → "
                       f"{c.cell(_vals(record, f'policy_pref_final_{k}')[lab], 2)} ({min(n)}–{max(n)} pairs)")
        kind_rows.append(row)
    kinds = c.markdown_table(["arm", "rejected of another length (e.g. a dropped final carry)",
                              "only the ones digit wrong", "a higher digit wrong"], kind_rows)
    ar = s["arithmetic"]
    return (
        f"# {record['title']}\n\n"
        f"## (A) SFT budget before DPO\n\n{budget}\n\n"
        f"## (B) DPO vs SimPO vs ORPO from the same 10% SFT start\n\n{losses}\n\n"
        f"## Every run\n\n{raw_table}\n\n"
        f"## Policy prefers chosen, by how the rejected answer is wrong (start → end)\n\n{kinds}\n\n"
        f"Exact match: greedy answers to {s['em_problems']} held-out problems, checked exactly (the stages' "
        f"`exact_match`, at the last evaluation). Val reward accuracy: the dpo stage's `val_rewards/accuracies` on "
        f"{s['val_pairs']} validation pairs at the end, the share of pairs whose chosen reward is strictly above the "
        f"rejected one; for DPO the reward is beta × the log-ratio to the reference (the stage's start, so it is 0 "
        f"for every pair, accuracy 0, before the first step), for SimPO and ORPO beta × the policy's per-token "
        f"log-probability; \"− 0.5\" is against a coin flip. Policy prefers chosen: the same pairs scored by this "
        f"script with the stage's encoding, summed log-probability of chosen > rejected under the model at the "
        f"start of the preference stage (the base, or the SFT model) and at the end, one ranking for every loss. "
        f"SFT val loss: the sft stage's validation loss (nats per answer token of the right answers) at the "
        f"sft stage's end and measured again by the dpo stage at its end. Δ and \"effect\" follow the noise rule "
        f"(experiments/README.md).\n\n"
        f"Settings: {s['total_steps']} steps per run, {s['batch']} packed rows of {s['seq_len']} tokens per step "
        f"(whole pairs packed in the preference stage), AdamW, {s['schedule']} lr after {s['warmup_steps']} warmup "
        f"steps in each stage: SFT {s['sft_lr']:g}, preference {s['pref_lr']:g}; beta 0.1 (DPO), 2.0 with gamma "
        f"{s['simpo_gamma']:g} (SimPO), lambda 0.1 (ORPO); {ar['train_count']:,} training problems "
        f"({', '.join(ar['ops'])}, {ar['min_digits']}..{ar['max_digits']}-digit operands, {ar['format']} answers), "
        f"the generator seeded by the run's seed; evaluation every {s['eval_every']} steps and at each stage's end. "
        f"Base: experiment 8's {s['base_steps']}-step code model, {s['precision']}. Whole experiment "
        f"{record['wall_total_s'] / 60:.1f} min wall (the runs and the policy preference scoring, two at a "
        f"time), {record['cpu_total_s'] / 60:.1f} min of CPU on {m['cpu']}; 1-minute load average "
        f"{load['start']:g} at the start and {load['end']:g} at the end (above 2, the wall time includes waiting "
        f"for the shared cores).\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    s = record["settings"]
    fig, axes = c.figure(3)
    colours = {a["label"]: f"C{i}" for i, a in enumerate(s["arms"])}
    panels = [(axes[0], s["budget_arms"], "val_rewards/accuracies"),
              (axes[1], s["loss_arms"], "val_rewards/accuracies"),
              (axes[2], [a["label"] for a in s["arms"] if a["sft_steps"]], "val_loss/chat")]
    for ax, labels, key in panels:
        for lab in labels:
            c.band(ax, record, lab, key, colours[lab])
            ax.lines[-1].set_marker("o")  # few evaluations per run: show where they are
        ax.legend()
    for ax in axes[:2]:
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlabel="step (SFT steps, then preference steps)", ylabel="val reward accuracy")
    axes[0].set(title="(A) SFT budget: reward accuracy, mean of seeds, min-max")
    axes[1].set(title="(B) loss at 10% SFT: reward accuracy")
    axes[2].set(xlabel="step", ylabel="nats per answer token", title="SFT validation loss (right answers)")
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
