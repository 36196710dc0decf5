"""SFT experiment 8: plain vs reversed answers on addition, and what SFT costs the pre-training domain.

Claim (Lee et al. 2023, "Teaching Arithmetic to Small Transformers"): a small transformer learns
addition with far fewer samples / steps when the answer is written least significant digit first
("128+367=" -> "594"), the order in which carries propagate, than in plain order ("495").
Set-up: ONE base model pre-trained on the CPython standard library (BASE_STEPS steps, cached so a
rerun skips it), then per answer format (plain, reversed) and seed one `kind: sft` run from it
(`init_from`) on the built-in `arithmetic` chat set. The seed sets the SFT run's data order and the
generator seed of its problems (so its train and validation problems too). exact_match (greedy
answers to sft.eval_generate validation problems, checked exactly) every EVAL_EVERY steps; the
pre-training domain's validation loss before SFT (the base) and after (each run's final model) is
measured with `stagewise eval RUN --data <the base's prepared dataset>` on the same windows.

Tokenizer: the paper gives every digit its own token. stagewise's byte-level BPE, trained on code,
merges digit groups ("12", "00", "001"), so a plain and a reversed answer of the same number are
different token sequences of different lengths, and a digit-wise algorithm cannot be read off
token positions (the first version of this experiment learned neither format; README §8). Here the
base's BPE is trained by this script with the same recipe as stagewise.data.tokenizer.train_bpe
(byte level, the same special tokens at ids 0, 1, 2, so the built-in ChatML template applies) plus
a pre-tokenizer that splits every digit off on its own, and the base recipe loads it through
data.tokenizer.path. stagewise itself is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _common as c

EXP = "sft_arithmetic"
FORMATS = ("plain", "reversed")
BASE_SEED = 0
BASE_STEPS = 120
VOCAB = 512                # with N_LAYERS = 2, ~2x the SFT steps per second of base.yaml's 4 layers x 2048;
N_LAYERS = 2               # a take-off needs ~700+ steps, which 4 x 2048 cannot fit in the budget (README §8)
SFT_STEPS = 900
SFT_BATCH = 32             # packed rows of SEQ_LEN; 16 rows learned later per token in pilots (README §8)
SEQ_LEN = 64
SFT_LR = 3e-3              # constant after warmup: pilots at 1e-3 (cosine) learned neither format (README §8)
SFT_SCHEDULE = "constant"
SFT_WARMUP = 20
EVAL_EVERY = 50
DIGITS = (1, 2)            # 1..3 digits is out of this budget's reach (README §8)
TRAIN_COUNT = 5000         # 1..2-digit addition has ~9,000 distinct training problems
EVAL_PROBLEMS = 100
EVAL_TOKENS = 32768        # pre-training validation tokens per forgetting measurement
THRESHOLDS = (0.5, 0.9)
CHECK_TEXT = "123+456="
TOKENIZER = c.HERE / "runs" / EXP / f"digit-bpe-{VOCAB}" / "tokenizer.json"
COMMON = ("--precision.mode=fp32", "--precision.telemetry_every=0")  # no bf16 emulation cost on this CPU
BASE = c.Spec("base", "base", (f"--data.tokenizer.path={TOKENIZER}", f"--model.n_layers={N_LAYERS}",
                               f"--train.steps={BASE_STEPS}",
                               "--schedule.warmup_steps=12", "--eval.every=0", "--threads=2", *COMMON))
TITLE = (f"SFT on addition ({DIGITS[0]}..{DIGITS[1]}-digit operands, one token per digit): plain vs reversed "
         f"answers, {SFT_STEPS} steps from a {BASE_STEPS}-step code model (d128 x {N_LAYERS} layers)")


def sft_spec(fmt: str, seed: int, base_dir) -> c.Spec:
    return c.Spec(fmt, fmt, (
        "--kind=sft", f"--init_from={base_dir}", f"--train.steps={SFT_STEPS}", f"--train.batch_size={SFT_BATCH}",
        f"--data.seq_len={SEQ_LEN}",
        f"--optim.lr={SFT_LR}", f"--schedule.name={SFT_SCHEDULE}", f"--schedule.warmup_steps={SFT_WARMUP}",
        f"--eval.every={EVAL_EVERY}", *COMMON,
        "--sft.data=[{kind: arithmetic}]", f"--sft.arithmetic.format={fmt}",
        f"--sft.arithmetic.min_digits={DIGITS[0]}", f"--sft.arithmetic.max_digits={DIGITS[1]}",
        f"--sft.arithmetic.train_count={TRAIN_COUNT}", f"--sft.arithmetic.seed={seed}",
        f"--sft.eval_generate={EVAL_PROBLEMS}", f"--sft.eval_max_new_tokens={DIGITS[1] + 2}"))


def digit_tokenizer() -> dict:
    """Train the base's BPE (train_bpe's recipe, digits split one per token) on the base's own training
    documents and save it as TOKENIZER; the file is rewritten only when its content changes, because the
    prepared-dataset cache keys a given tokenizer by its path, size and mtime."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from stagewise.config.schema import DataConfig, SourceConfig, TokenizerConfig
    from stagewise.data import Tokenizer, iter_documents
    from stagewise.data.shards import split_value
    from stagewise.data.tokenizer import TRAINED_SPECIALS

    t0 = time.perf_counter()
    cfg = DataConfig(sources=[SourceConfig(kind="python-stdlib")], tokenizer=TokenizerConfig(vocab_size=VOCAB))
    # The documents train_bpe would see: the training split (by stagewise's document hash), lowest
    # hash first, cut at data.tokenizer.train_bytes (the whole split, ~12 MB, fits).
    docs = sorted((split_value(i, d.doc_id), d.text) for i, src in enumerate(cfg.sources)
                  for d in iter_documents(src, f"data.sources[{i}]"))
    texts, left = [], cfg.tokenizer.train_bytes
    for u, text in docs:
        if u < cfg.val_fraction or left <= 0:
            continue
        data = text.encode("utf-8")[:left]
        texts.append(data.decode("utf-8", "ignore"))
        left -= len(data)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if [tok.token_to_id(t) for t in TRAINED_SPECIALS] != list(range(len(TRAINED_SPECIALS))):
        raise SystemExit(f"digit BPE: special tokens not at ids 0..{len(TRAINED_SPECIALS) - 1}")
    text = tok.to_str(pretty=True)
    TOKENIZER.parent.mkdir(parents=True, exist_ok=True)
    if not TOKENIZER.is_file() or TOKENIZER.read_text(encoding="utf-8") != text:
        TOKENIZER.write_text(text, encoding="utf-8")
    loaded = Tokenizer.load(TOKENIZER)
    pieces = [loaded.decode([i]) for i in loaded.encode(CHECK_TEXT)]
    if pieces != list(CHECK_TEXT) or loaded.chat_template is None:
        raise SystemExit(f"digit BPE: {CHECK_TEXT!r} encodes as {pieces} (chat template: "
                         f"{loaded.chat_template is not None}); expected one token per character")
    wall = time.perf_counter() - t0
    print(f"  digit BPE: vocab {loaded.vocab_size}, {CHECK_TEXT!r} -> {pieces}, {wall:.0f}s", flush=True)
    return {"check": CHECK_TEXT, "pieces": pieces, "vocab_size": loaded.vocab_size, "sha256": loaded.sha256,
            "train_bytes": sum(len(t.encode("utf-8")) for t in texts), "wall_s": round(wall, 1)}


def base_run(tokenizer_sha: str) -> dict:
    """The base model, trained once: reused while its stamp matches its overrides and tokenizer."""
    run_dir = c.run_dir(EXP, BASE.name, BASE_SEED)
    stamp = run_dir.parent / f"{run_dir.name}.json"
    want = {"overrides": list(BASE.overrides), "seed": BASE_SEED, "tokenizer_sha256": tokenizer_sha}
    if stamp.is_file() and (run_dir / "final").is_dir():
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"  {run_dir.name}: cached ({have['wall_s']:.0f}s when trained)", flush=True)
            return {**have, "cached": True, "dir": run_dir}
    run = c._train(EXP, BASE, BASE_SEED)
    out = {**want, "wall_s": run["wall_s"], "final_train_loss": run["metrics"][-1]["loss"]}
    stamp.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "cached": False, "dir": run_dir}


def pretrain_eval(model_dir, dataset: str) -> dict:
    """`stagewise eval` on the base's pre-training validation split (the same windows for every model)."""
    cmd = [sys.executable, "-m", "stagewise", "eval", str(model_dir), f"--data={dataset}", "--seq-len=128",
           f"--max-tokens={EVAL_TOKENS}", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=c.REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"eval {model_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    num = {k: float(re.search(rf"^{k}: ([\d.]+)", proc.stdout, re.M).group(1)) for k in ("loss", "bits per byte")}
    return {"loss": num["loss"], "bpb": num["bits per byte"]}


def main():
    print(f"{EXP}:")
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    tok = digit_tokenizer()
    base = base_run(tok["sha256"])
    t_sft = time.perf_counter()
    dataset = json.loads((base["dir"] / "run_info.json").read_text())["dataset"]
    jobs = [(sft_spec(fmt, seed, base["dir"]), seed) for fmt in FORMATS for seed in c.SEEDS]
    with ThreadPoolExecutor(c.WORKERS) as pool:
        done = list(pool.map(lambda job: c._train(EXP, *job), jobs))
        evals = list(pool.map(lambda d: pretrain_eval(d, dataset), [base["dir"]] + [r["dir"] for r in done]))
    before = evals[0]
    for r, after in zip(done, evals[1:]):
        r["pretrain_before"], r["pretrain_after"] = before, after
    runs = {fmt: [r for r in done if r["label"] == fmt] for fmt in FORMATS}
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    settings = {"base_steps": BASE_STEPS, "base_seed": BASE_SEED, "vocab_size": VOCAB, "n_layers": N_LAYERS,
                "sft_steps": SFT_STEPS, "eval_every": EVAL_EVERY, "digits": list(DIGITS), "train_count": TRAIN_COUNT,
                "eval_problems": EVAL_PROBLEMS, "pretrain_eval_tokens": EVAL_TOKENS, "sft_lr": SFT_LR,
                "sft_schedule": SFT_SCHEDULE, "sft_warmup_steps": SFT_WARMUP, "sft_batch": SFT_BATCH,
                "sft_seq_len": SEQ_LEN, "base": "base.yaml", "precision": "fp32"}
    wall = time.perf_counter() - t0
    extra = {"tokenizer": tok,
             "base_run": {"wall_s": base["wall_s"], "cached": base["cached"], "pretrain_val": before},
             "wall_total_s": round(wall, 1), "wall_sft_s": round(time.perf_counter() - t_sft, 1),
             "cpu_total_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
             # the 2 cores are shared: a load above 2 at the start or end means the wall time includes waiting
             "load_average_1min": {"start": load0, "end": round(os.getloadavg()[0], 2)}}
    c.save_record(EXP, TITLE, settings, runs, summarise, extra)
    c.write_outputs(sys.modules[__name__])


def summarise(run: dict) -> tuple[dict, dict]:
    recs = run["metrics"]
    final = {"exact_match": c.last(recs, "exact_match"), "val_loss": c.last(recs, "val_loss"),
             "val_bpb": c.last(recs, "val_bpb"),
             "pretrain_loss_before": run["pretrain_before"]["loss"],
             "pretrain_loss_after": run["pretrain_after"]["loss"],
             "pretrain_bpb_before": run["pretrain_before"]["bpb"], "pretrain_bpb_after": run["pretrain_after"]["bpb"]}
    return final, {k: c.curve(recs, k) for k in ("exact_match", "val_loss", "val_bpb")}


# ------------------------------------------------------------------ table and plot (from the record alone)

def _curves(record: dict, label: str, key: str) -> list[list[list[float]]]:
    return [r["curves"][key] for r in sorted(record["runs"], key=lambda r: r["seed"]) if r["label"] == label]


def _first_step(curve: list[list[float]], threshold: float):
    return next((s for s, v in curve if v >= threshold), None)


def _reach_cell(steps: list) -> str:
    hit = [s for s in steps if s is not None]
    if len(hit) == len(steps):
        return c.cell(hit, 0)
    return f"{len(hit)}/{len(steps)} seeds" + (f" ({', '.join(str(int(s)) for s in hit)})" if hit else "")


def table(record: dict) -> str:
    s, labels = record["settings"], record["labels"]
    plain, rev = labels
    em = {lab: _curves(record, lab, "exact_match") for lab in labels}
    steps = [st for st, _ in em[plain][0]]
    rows = []
    for i, st in enumerate(steps):
        vals = {lab: [100 * cv[i][1] for cv in em[lab]] for lab in labels}
        rows.append([int(st), c.cell(vals[plain], 1), c.cell(vals[rev], 1), c.delta_cell(vals[rev], vals[plain], 1)])
    curve_table = c.markdown_table(["step", f"{plain} exact match %", f"{rev} exact match %",
                                    f"Δ {rev} − {plain} (points)"], rows)

    final_em = {lab: [100 * v for v in vals] for lab, vals in c.by_label(record, "exact_match").items()}
    final_loss, final_bpb = c.by_label(record, "val_loss"), c.by_label(record, "val_bpb")
    reach_rows = []
    for lab in labels:
        reach = [_reach_cell([_first_step(cv, t) for cv in em[lab]]) for t in THRESHOLDS]
        reach_rows.append([lab, *reach, c.cell(final_em[lab], 1), c.cell(final_loss[lab]), c.cell(final_bpb[lab])])
    reach_rows.append([f"**{rev} − {plain}**", "", "", c.delta_cell(final_em[rev], final_em[plain], 1),
                       c.delta_cell(final_loss[rev], final_loss[plain]),
                       c.delta_cell(final_bpb[rev], final_bpb[plain])])
    reach_table = c.markdown_table(["format", *[f"first eval ≥ {100 * t:g}%" for t in THRESHOLDS],
                                    "final exact match %", "final SFT val loss", "final SFT val bits/byte"],
                                   reach_rows)

    before, after = c.by_label(record, "pretrain_loss_before"), c.by_label(record, "pretrain_loss_after")
    bpb_before, bpb_after = c.by_label(record, "pretrain_bpb_before"), c.by_label(record, "pretrain_bpb_after")
    forget_rows = []
    for r in sorted(record["runs"], key=lambda r: (labels.index(r["label"]), r["seed"])):
        f = r["final"]
        forget_rows.append([r["label"], r["seed"], f"{f['pretrain_loss_before']:.3f}",
                            f"{f['pretrain_loss_after']:.3f}",
                            f"{f['pretrain_loss_after'] - f['pretrain_loss_before']:+.3f}",
                            f"{f['pretrain_bpb_before']:.3f} → {f['pretrain_bpb_after']:.3f}"])
    for lab in labels:
        forget_rows.append([f"**{lab}, mean**", "", c.cell(before[lab]), c.cell(after[lab]),
                            c.delta_cell(after[lab], before[lab]),
                            f"{c.cell(bpb_before[lab])} → {c.cell(bpb_after[lab])}"])
    forget_rows.append([f"**{rev} − {plain}, after SFT**", "", "", "", c.delta_cell(after[rev], after[plain]), ""])
    forget_table = c.markdown_table(["run", "seed", "before SFT (nats/token)", "after SFT", "Δ after − before",
                                     "bits/byte before → after"], forget_rows)

    base, m, tok = record["base_run"], record["machine"], record["tokenizer"]
    load = record["load_average_1min"]
    return (
        f"# {record['title']}\n\n"
        f"## Exact match against SFT steps\n\n{curve_table}\n\n"
        f"Greedy answers to {s['eval_problems']} validation problems per evaluation (each seed has its own "
        f"problems), checked exactly; Δ is paired by seed (same base, same data order and problems).\n\n"
        f"## Steps to accuracy\n\n{reach_table}\n\n"
        f"First evaluation step (every {s['eval_every']}) at or above the accuracy, mean ± std over the seeds that "
        f"reach it; \"k/n seeds\" when not all do within {s['sft_steps']} steps. SFT val loss: nats per assistant "
        f"token of the validation conversations (with one token per digit a plain and a reversed answer are the "
        f"same tokens in another order, so nats per token compare directly).\n\n"
        f"## Forgetting: the pre-training domain (CPython stdlib) before and after SFT\n\n{forget_table}\n\n"
        f"`stagewise eval RUN --data <base's prepared dataset>`: {s['pretrain_eval_tokens']:,} evenly spaced "
        f"validation tokens of the base's own split, the same windows for every model; \"before\" is the base "
        f"model, the same for every run (so the Δ's spread is that of the after-SFT losses).\n\n"
        f"Base: {s['base_steps']} steps on python-stdlib (base.yaml with {s['n_layers']} layers, {s['precision']}), "
        f"seed {s['base_seed']}, with this script's byte-level BPE (vocab {tok['vocab_size']}, every digit its own "
        f"token: `{tok['check']}` → {' '.join(f'`{p}`' for p in tok['pieces'])}), {base['wall_s']:.0f} s to "
        f"tokenize its corpus and train"
        f"{' (cached in this run, not in its wall time)' if base['cached'] else ''}. SFT: {s['sft_steps']} steps, "
        f"{s['sft_batch'] * s['sft_seq_len']} tokens per step ({s['sft_batch']} packed rows of {s['sft_seq_len']}), "
        f"AdamW lr {s['sft_lr']:g} "
        f"{s['sft_schedule']} after {s['sft_warmup_steps']} warmup steps, {s['train_count']:,} training problems "
        f"with operands of {s['digits'][0]}..{s['digits'][1]} digits. Whole experiment "
        f"{record['wall_total_s'] / 60:.1f} min wall (SFT runs and evaluations {record['wall_sft_s'] / 60:.1f} min), "
        f"{record['cpu_total_s'] / 60:.1f} min of CPU (all processes) on {m['cpu']}; 1-minute load average "
        f"{load['start']:g} at the start and {load['end']:g} at the end (the 2 cores are shared: above 2, "
        f"the wall time includes waiting for them).\n\n" + c.provenance(record) + "\n")


def plot(record: dict, path) -> None:
    fig, axes = c.figure(2)
    for i, lab in enumerate(record["labels"]):
        c.band(axes[0], record, lab, "exact_match", f"C{i}")
        c.band(axes[1], record, lab, "val_bpb", f"C{i}")
    axes[0].set(xlabel="SFT step", ylabel="exact match", title="validation exact match: mean of seeds, min-max band")
    axes[1].set(xlabel="SFT step", ylabel="bits per byte (assistant tokens)", title="SFT validation loss")
    axes[0].legend()
    c.save_figure(fig, path)


if __name__ == "__main__":
    main()
