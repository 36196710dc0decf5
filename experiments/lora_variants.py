"""Adapter experiment 9: full fine-tuning vs LoRA vs DoRA vs PiSSA vs EVA at equal steps.

Claims tested:
  * PiSSA (Meng et al. 2024) converges faster than LoRA: initialising the adapter with W's principal
    singular directions (residual frozen) should lower the new task's loss sooner than LoRA's zero-B
    start, at the same rank, lr and steps.
  * "LoRA Learns Less and Forgets Less" (Biderman et al. 2024): against full fine-tuning LoRA reaches a
    worse loss on the new task and loses less of the pre-training domain.
Set-up: the base of experiment 8 (sft_arithmetic.py: a 2-layer d128 code model with a digit-splitting
BPE, cached), then per method and seed one `kind: sft` run on reversed-answer addition (1..2-digit
operands) for SFT_STEPS steps: full (every weight, lr FULL_LR) and the four adapters (r RANK, alpha
2 * RANK, all-linear, lr ADAPTER_LR; eva reads 4 batches before step 1). The seed sets the data order
and the problems. Measured: the SFT validation loss (nats per assistant token) along the run and at the
end, greedy exact match at the end, and forgetting: the pre-training domain's loss after SFT minus
before, `stagewise eval` on the same windows of the base's validation split.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _common as c
import sft_arithmetic as arith

EXP = "lora_variants"
METHODS = ("full", "lora", "dora", "pissa", "eva")
SFT_STEPS = 300
RANK = 16
FULL_LR = 3e-3             # experiment 8's SFT lr
ADAPTER_LR = 3e-3          # the same lr as full fine-tuning (PiSSA's comparison); 1e-2 was too high (README §9)
EVAL_EVERY = 25
EVAL_PROBLEMS = 50
TITLE = (f"Full fine-tuning vs LoRA / DoRA / PiSSA / EVA (r {RANK}, all-linear) on reversed addition, "
         f"{SFT_STEPS} SFT steps from experiment 8's code model (d128 x 2 layers)")


def spec(method: str, seed: int, base_dir) -> c.Spec:
    base = arith.sft_spec("reversed", seed, base_dir)
    keep = [o for o in base.overrides if not o.startswith(("--train.steps=", "--optim.lr=", "--eval.every=",
                                                           "--sft.eval_generate="))]
    extra = [f"--train.steps={SFT_STEPS}", f"--eval.every={EVAL_EVERY}", f"--sft.eval_generate={EVAL_PROBLEMS}"]
    if method == "full":
        extra.append(f"--optim.lr={FULL_LR}")
    else:
        kind = "dora" if method == "dora" else "lora"
        init = method if method in ("pissa", "eva") else "default"
        extra += [f"--optim.lr={ADAPTER_LR}", f"--adapter.kind={kind}", f"--adapter.r={RANK}",
                  f"--adapter.alpha={2 * RANK}", f"--adapter.init={init}"]
    return c.Spec(method, method, tuple(keep + extra))


def main():
    print(f"{EXP}:")
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    tok = arith.digit_tokenizer()
    base = arith.base_run(tok["sha256"])
    dataset = json.loads((base["dir"] / "run_info.json").read_text())["dataset"]
    jobs = [(spec(m, seed, base["dir"]), seed) for m in METHODS for seed in c.SEEDS]
    with ThreadPoolExecutor(c.WORKERS) as pool:
        done = list(pool.map(lambda job: c._train(EXP, *job), jobs))
        evals = list(pool.map(lambda d: arith.pretrain_eval(d, dataset), [base["dir"]] + [r["dir"] for r in done]))
    for r, after in zip(done, evals[1:]):
        r["pretrain_before"], r["pretrain_after"] = evals[0], after
    runs = {m: [r for r in done if r["label"] == m] for m in METHODS}
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    settings = {"sft_steps": SFT_STEPS, "rank": RANK, "alpha": 2 * RANK, "full_lr": FULL_LR, "adapter_lr": ADAPTER_LR,
                "eval_every": EVAL_EVERY, "eval_problems": EVAL_PROBLEMS, "batch": arith.SFT_BATCH,
                "seq_len": arith.SEQ_LEN, "digits": list(arith.DIGITS), "format": "reversed",
                "base_steps": arith.BASE_STEPS, "schedule": arith.SFT_SCHEDULE, "warmup": arith.SFT_WARMUP}
    extra = {"base_run": {"wall_s": base["wall_s"], "cached": base["cached"], "pretrain_val": evals[0]},
             "wall_total_s": round(time.perf_counter() - t0, 1),
             "cpu_total_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
             "load_average_1min": {"start": load0, "end": round(os.getloadavg()[0], 2)}}
    c.save_record(EXP, TITLE, settings, runs, summarise, extra)
    c.write_outputs(sys.modules[__name__])


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    curve = c.curve(recs, "val_loss")
    early = next(v for s, v in curve if s >= SFT_STEPS // 3)
    final = {"val_loss": c.last(recs, "val_loss"), "val_loss_at_third": early,
             "exact_match": c.last(recs, "exact_match"),
             "pretrain_loss_before": run["pretrain_before"]["loss"], "pretrain_loss_after": run["pretrain_after"]["loss"],
             "forgetting": run["pretrain_after"]["loss"] - run["pretrain_before"]["loss"]}
    return final, {k: c.curve(recs, k) for k in ("val_loss", "exact_match")}


def table(record: dict) -> str:
    s, labels = record["settings"], record["labels"]
    get = {k: c.by_label(record, k) for k in ("val_loss_at_third", "val_loss", "exact_match", "forgetting")}
    rows = []
    for lab in labels:
        em = [100 * v for v in get["exact_match"][lab]]
        rows.append([lab, c.cell(get["val_loss_at_third"][lab]), c.cell(get["val_loss"][lab]), c.cell(em, 1),
                     c.cell(get["forgetting"][lab])])
    main_table = c.markdown_table(["method", f"SFT val loss at step {s['sft_steps'] // 3}", "final SFT val loss",
                                   "final exact match %", "forgetting (Δ pre-training loss)"], rows)
    pairs = [("pissa", "lora", "val_loss_at_third", "PiSSA − LoRA, SFT val loss at 1/3 of the run"),
             ("pissa", "lora", "val_loss", "PiSSA − LoRA, final SFT val loss"),
             ("lora", "full", "val_loss", "LoRA − full, final SFT val loss (> 0: LoRA learns less)"),
             ("lora", "full", "forgetting", "LoRA − full, forgetting (< 0: LoRA forgets less)"),
             ("dora", "lora", "val_loss", "DoRA − LoRA, final SFT val loss"),
             ("eva", "lora", "val_loss", "EVA − LoRA, final SFT val loss")]
    claim_rows = [[what, c.delta_cell(get[k][a], get[k][b])] for a, b, k, what in pairs]
    claims = c.markdown_table(["paired difference (same seed: same data and problems)", "mean ± std"], claim_rows)
    m, load = record["machine"], record["load_average_1min"]
    return (
        f"# {record['title']}\n\n## Results\n\n{main_table}\n\n## The claims\n\n{claims}\n\n"
        f"\"effect\" marks a difference whose sign is the same for every seed and whose mean exceeds "
        f"{c.NOISE_FACTOR:g}x its std across seeds (experiments/README.md); anything else is within the seed "
        f"noise at this scale.\n\n"
        f"SFT val loss: nats per assistant token of the validation conversations. Forgetting: `stagewise eval` "
        f"loss on the base's CPython-stdlib validation windows after SFT minus before (the same base for every "
        f"run). Settings: {s['sft_steps']} steps of {s['batch']} packed rows of {s['seq_len']} tokens, "
        f"{s['schedule']} lr after {s['warmup']} warmup steps: full fine-tuning at {s['full_lr']:g}, adapters at "
        f"{s['adapter_lr']:g} (r {s['rank']}, alpha {s['alpha']}, every linear layer of the blocks); greedy exact "
        f"match on {s['eval_problems']} validation problems. Whole experiment {record['wall_total_s'] / 60:.1f} "
        f"min wall, {record['cpu_total_s'] / 60:.1f} min CPU on {m['cpu']}; 1-minute load average "
        f"{load['start']:g} → {load['end']:g}.\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, axes = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        c.band(axes[0], record, lab, "val_loss", f"C{i}")
        c.band(axes[1], record, lab, "exact_match", f"C{i}")
    axes[0].set(xlabel="SFT step", ylabel="nats per assistant token", title="SFT validation loss (mean, min-max)")
    axes[1].set(xlabel="SFT step", ylabel="exact match", title="validation exact match")
    axes[0].legend()
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
