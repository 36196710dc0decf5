"""Supervised fine-tuning: stagewise's `sft` kind against TRL's SFTTrainer, padded and packed.

    python bench/sft.py --quick        # a tiny model and a few steps: does everything run (~2 min)
    python bench/sft.py                # the measurement (17-42 min here, on 2 cores shared with other jobs)
    python bench/sft.py --markdown     # the table of the last full run, from results/sft.jsonl
    python bench/sft.py --prepare      # only build the cached model, data and checks (~7 min once)

Both sides fine-tune the same weights on the same conversations with the same settings, and
each variant runs in a fresh child process, so its peak RSS (VmHWM) is its own. Each round runs
a mode's variants back to back, stagewise first in even rounds and last in odd ones, so that
machine noise hits both alike.

  model     a small stagewise Llama pre-trained for a few steps on python-stdlib (its run dir has a
            stagewise BPE with ChatML's <|im_start|>/<|im_end|>), exported with `stagewise export-hf`;
            stagewise starts from the run dir (init_from), TRL loads the export with
            AutoModelForCausalLM (fp32, sdpa). Cached under bench/.cache/sft/.
  data      stagewise's built-in arithmetic and python-docstrings conversations (train split),
            those of at most seq_len tokens (so neither side truncates), written to one JSONL of
            {"messages": [user, assistant]}; stagewise reads it as `kind: jsonl` and holds out
            sft.val_fraction of the rows by hash, TRL reads exactly the rows stagewise trains on
            (datasets.load_dataset("json")).
  loss      assistant tokens only on both sides: stagewise train_on: assistant, TRL
            assistant_only_loss=True; both take the spans from the ChatML template's
            {% generation %} markers, so the same tokens (assistant content + <|im_end|>) train.
            The prepare step checks that the token ids and the trained positions agree row by row.
  settings  fp32, seq_len, batch size, AdamW (lr, betas 0.9/0.95, eps 1e-8, weight decay 0.1),
            constant LR, gradient clipping 1.0, no evaluation, logging or checkpointing during the
            steps, eager (no compile), 2 torch threads, the same number of steps per mode, the first
            `warmup` steps of each child excluded from timing. TRL: gradient_checkpointing=False
            (TRL's default is True; stagewise does not recompute activations) and bf16=False (TRL's
            default is bf16 autocast).
  padded    stagewise sft.packing false: one example per row, batches of similar lengths, padded to
            the longest rounded up to 32. TRL packing=False: random batches padded to their longest
            (its default), and a second TRL variant with transformers' train_sampling_strategy=
            "group_by_length" (LengthGroupedSampler), the nearest TRL setting to stagewise's grouping.
  packed    stagewise sft.packing true: best-fit-decreasing into batch_size rows of seq_len, attention
            kept inside each example by a block-causal mask per row. TRL packing=True (its default
            strategy, bfd) which implies padding-free: the batch's packed rows are concatenated into
            one row of up to batch_size*seq_len tokens with restarting position_ids and no attention
            mask; the prepare step measures whether attention stays inside each example there.
  metric    real tokens/s: the tokens of the conversations in the timed steps (each conversation's
            rendered length n, on both sides: stagewise feeds n - 1 positions, ids[:-1] -> ids[1:],
            TRL n, its last position predicting nothing) over the wall time of those steps, step end
            to step end (data, forward, backward, clipping, optimizer, the frameworks' per-step
            bookkeeping); computed tokens/s: the positions of the batch tensors, padding included;
            padding: 1 - fed real positions / computed positions; peak RSS: the child's VmHWM after
            its last step (data loading and model load included, stagewise's end-of-run evaluation
            and checkpoint excluded). The machine's load average is recorded with every child.
            Real tokens per CPU-second (the child's CPU time over all its threads, same steps) is
            reported beside it: less sensitive than wall time to other jobs on a shared machine.
  ratios    stagewise over each TRL variant per round (the pair ran back to back), median over the
            rounds; the table also lists every round's ratio.

A full run appends one record (machine, versions, settings, parity checks, every step of every
child) to bench/results/sft.jsonl and rewrites bench/results/sft.md; --quick records nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sft_children import (CACHE, MODES, RESULTS, ROOT, SEED, SIZES, TABLE, THREADS, VAL_FRACTION,
                          check_child, paths, stagewise_child, trl_child)


# ----------------------------------------------------------------------------- preparation (once)

def sh(cmd: list, **kw) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, **kw)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd[:5]))} failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                         f"{out.stderr[-4000:]}")
    return out.stdout


def prepare(size: str) -> dict:
    """The base model (run dir + HF export), the conversations and the parity checks, made once."""
    s, p = SIZES[size], paths(size)
    p["dir"].mkdir(parents=True, exist_ok=True)
    prep = json.loads(p["prep"].read_text()) if p["prep"].is_file() else {}
    if not (p["base"] / "final").is_dir():
        shutil.rmtree(p["base"], ignore_errors=True)
        recipe = p["dir"] / "pretrain.yaml"
        recipe.write_text(f"""name: base
out_dir: {p['dir']}
seed: {SEED}
threads: {THREADS}
model: {{d_model: {s['d_model']}, n_layers: {s['n_layers']}, n_heads: {s['n_heads']}, max_seq_len: {s['seq']}}}
data:
  sources: [{{kind: python-stdlib}}]
  tokenizer: {{vocab_size: {s['vocab']}, train_bytes: {s['tok_bytes']}}}
  seq_len: {s['seq']}
  cache_dir: {CACHE / 'data_cache'}
train: {{steps: {s['pretrain_steps']}, batch_size: 8}}
optim: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup_steps: 1}}
precision: {{mode: fp32, telemetry_every: 0}}
eval: {{every: 0, batches: 1}}
checkpoint: {{every: 0, keep_last: 1}}
log: {{progress: plain, every: 5}}
""")
        print(f"prepare: pre-training the base model ({s['pretrain_steps']} steps) -> {p['base']}", flush=True)
        sh([sys.executable, "-m", "stagewise", "run", recipe])
    if not (p["hf"] / "config.json").is_file():
        shutil.rmtree(p["hf"], ignore_errors=True)
        sh([sys.executable, "-m", "stagewise", "export-hf", p["base"], p["hf"]])
        # Without a chat template in the export AutoTokenizer has none and TRL cannot render the
        # conversations; then write stagewise's built-in ChatML (what its BPE uses). prepare.json
        # records whether export-hf wrote one itself (it does: tokenizer_config.json's chat_template).
        cfg_json = json.loads((p["hf"] / "tokenizer_config.json").read_text())
        prep["export_wrote_chat_template"] = (p["hf"] / "chat_template.jinja").is_file() or "chat_template" in cfg_json
        if not prep["export_wrote_chat_template"]:
            from stagewise.data.chat import CHATML, TEMPLATE_FILE

            (p["hf"] / TEMPLATE_FILE).write_text(CHATML)
        p["prep"].write_text(json.dumps(prep, indent=1))
    if not p["trl"].is_file():
        prep.update(write_conversations(size))
        p["prep"].write_text(json.dumps(prep, indent=1))
    if not p["check"].is_file():
        print("prepare: parity checks (tokens, trained positions, weights, TRL's packed attention)", flush=True)
        sh([sys.executable, __file__, "--child", "check", "--size", size])
    prep["check"] = json.loads(p["check"].read_text())
    return prep


def write_conversations(size: str) -> dict:
    """chat.jsonl (stagewise) and chat_trl.jsonl (the rows stagewise's hash split trains on)."""
    from stagewise.data.builtin_chat import builtin_conversations
    from stagewise.data.chat import require_template
    from stagewise.data.conversations import read_conversations
    from stagewise.data.sft_data import row_split
    from stagewise.data.tokenizer import Tokenizer

    s, p = SIZES[size], paths(size)
    tok = Tokenizer.load(p["base"] / "tokenizer.json")
    template = require_template(tok, "bench")
    rng = random.Random(SEED)
    rows, stats = [], {}
    for name, opts in (("arithmetic", {"train_count": 4 * s["per_source"], "val_count": 10, "fmt": "plain"}),
                       ("python-docstrings", {})):
        items = [c for c in builtin_conversations(name, **opts) if c["split"] == "train"]
        rng.shuffle(items)
        kept, too_long = [], 0
        for c in items:
            if len(kept) == s["per_source"]:
                break
            n = len(template.encode(tok, c["messages"])[0])
            if n > s["seq"]:
                too_long += 1
                continue
            kept.append((n, c["messages"]))
        stats[name] = {"rows": len(kept), "skipped_longer_than_seq": too_long,
                       "mean_tokens": statistics.mean(n for n, _ in kept)}
        rows += kept
    rng.shuffle(rows)
    with p["chat"].open("w") as f:
        for _, messages in rows:
            f.write(json.dumps({"messages": messages}) + "\n")
    train = [i for i, conv in enumerate(read_conversations(p["chat"]))
             if row_split(conv.source, VAL_FRACTION) == "train"]
    with p["trl"].open("w") as f:
        for i in train:
            f.write(json.dumps({"messages": rows[i][1]}) + "\n")
    lengths = [rows[i][0] for i in train]
    return {"data": {**stats, "train_rows": len(train), "val_rows": len(rows) - len(train),
                     "train_tokens": sum(lengths), "mean_tokens": statistics.mean(lengths),
                     "max_tokens": max(lengths)}}


# ----------------------------------------------------------------------------- the parent

def summarise(res: dict, warmup: int) -> dict:
    timed = res["steps"][warmup:]
    t = sum(x["time"] for x in timed)
    return {"real_tokens_per_s": sum(x["real"] for x in timed) / t,
            "computed_tokens_per_s": sum(x["computed"] for x in timed) / t,
            "examples_per_s": sum(x["examples"] for x in timed) / t,
            "real_tokens_per_cpu_s": sum(x["real"] for x in timed) / sum(x["cpu"] for x in timed),
            "padding_fraction": 1 - sum(x["positions"] for x in timed) / sum(x["computed"] for x in timed),
            "timed_s": t, "peak_rss": res["peak_rss"], "rss_before_train": res["rss_before_train"]}


def machine() -> dict:
    import torch
    import transformers
    import trl

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s+(.+)", lscpu)
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    return {"cpu": name.group(1).strip() if name else platform.processor(), "cores": os.cpu_count(),
            "flags_of_note": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                              "avx512_vnni", "avx_vnni"}),
            "load_avg_at_start": os.getloadavg()[0],
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version()}


SIDES = {"padded": ("stagewise", "trl", "trl-grouped"), "packed": ("stagewise", "trl")}
NAMES = {"stagewise": "stagewise", "trl": "TRL SFTTrainer", "trl-grouped": "TRL, group_by_length"}


def run_child(side: str, size: str, mode: str, warmup: int, timed: int) -> dict:
    t0 = time.perf_counter()
    out = sh([sys.executable, __file__, "--child", side, "--size", size, "--mode", mode,
              "--warmup", warmup, "--timed", timed],
             env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"})
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    res["load_avg_1min_at_end"] = os.getloadavg()[0]
    return res


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def aggregate(record: dict) -> None:
    """Medians per variant, and stagewise's ratio to each TRL variant per round (the two ran back to
    back, so a change in the machine's load hits a round's pair more alike than two rounds)."""
    keys = ("real_tokens_per_s", "real_tokens_per_cpu_s", "computed_tokens_per_s", "examples_per_s",
            "padding_fraction", "peak_rss", "rss_before_train")
    ratio_keys = ("real_tokens_per_s", "real_tokens_per_cpu_s", "peak_rss")
    rows = record["rounds"]
    record["median"], record["ratios"] = {}, {}
    for mode in {x["mode"] for x in rows}:
        sides = [sd for sd in SIDES[mode] if any(x["mode"] == mode and x["side"] == sd for x in rows)]
        record["median"][mode] = {sd: {k: statistics.median(x[k] for x in rows if x["mode"] == mode and x["side"] == sd)
                                       for k in keys} for sd in sides}
        record["ratios"][mode] = {}
        for sd in sides[1:]:
            per_round = []
            for r in sorted({x["round"] for x in rows}):
                pick = {x["side"]: x for x in rows if x["mode"] == mode and x["round"] == r}
                per_round.append({k: pick["stagewise"][k] / pick[sd][k] for k in ratio_keys})
            record["ratios"][mode][sd] = {**{k: statistics.median(x[k] for x in per_round) for k in ratio_keys},
                                          "per_round": per_round}


def table(record: dict) -> str:
    s, m = record["settings"], record["machine"]
    lines = [f"{record['date'][:10]}, {m['cpu']} ({', '.join(m['flags_of_note'])}; no native bf16), {THREADS} "
             f"threads, shared machine (1-min load average {min(record['load_avgs']):.1f}-"
             f"{max(record['load_avgs']):.1f} on 2 cores), torch {m['torch']}, transformers {m['transformers']}, "
             f"TRL {m['trl']}. Model: Llama d_model {s['d_model']}, {s['n_layers']} layers, vocab {s['vocab']}, "
             f"fp32, eager; batch {s['batch']}, seq_len {s['seq']}; steps per child (warm-up + timed): "
             + ", ".join(f"{k} {w} + {t}" for k, (w, t) in s["steps"].items())
             + f"; {s['rounds']} alternating rounds, each variant in its own process.", "",
             "| mode | framework | real tokens/s | stagewise ÷ this (each round) | real tokens per CPU-s | "
             "stagewise ÷ this | computed tokens/s | padding | peak RSS | stagewise ÷ this | RSS before step 1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        if mode not in record["median"]:
            continue
        for side, v in record["median"][mode].items():
            rt = record["ratios"][mode].get(side)
            speed = "—" if rt is None else f"**{rt['real_tokens_per_s']:.2f}x** (" + ", ".join(
                f"{x['real_tokens_per_s']:.2f}" for x in rt["per_round"]) + ")"
            mem = "—" if rt is None else f"**{rt['peak_rss']:.2f}x**"
            cpu = "—" if rt is None else f"{rt['real_tokens_per_cpu_s']:.2f}x"
            lines.append(f"| {mode} | {NAMES[side]} | {v['real_tokens_per_s']:,.0f} | {speed} | "
                         f"{v['real_tokens_per_cpu_s']:,.0f} | {cpu} | "
                         f"{v['computed_tokens_per_s']:,.0f} | {v['padding_fraction']:.1%} | {gib(v['peak_rss'])} | "
                         f"{mem} | {gib(v['rss_before_train'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run (nothing recorded)")
    ap.add_argument("--rounds", type=int, help="alternating rounds per mode (default: 2, quick 1)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--markdown", action="store_true", help="print the table of the last full run and exit")
    ap.add_argument("--prepare", action="store_true", help="only build the cached model, data and checks")
    ap.add_argument("--child", choices=["stagewise", "trl", "trl-grouped", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--size", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "check":
        check_child(a.size)
        return
    if a.child == "stagewise":
        print(json.dumps(stagewise_child(a.size, a.mode, a.warmup, a.timed)))
        return
    if a.child:
        print(json.dumps(trl_child(a.size, a.mode, a.warmup, a.timed, grouped=a.child == "trl-grouped")))
        return
    if a.markdown:
        full = [json.loads(x) for x in RESULTS.read_text().splitlines() if '"size": "full"' in x and '"load_avgs"' in x]
        print(table(full[-1]) if full else "no full run recorded yet")
        return

    size = "quick" if a.quick else "full"
    s = SIZES[size]
    rounds = a.rounds or s["rounds"]
    t_start = time.perf_counter()
    prep = prepare(size)
    print(f"prepare: {json.dumps(prep)}", flush=True)
    if a.prepare:
        return
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "size": size, "machine": machine(),
              "settings": {**{k: v for k, v in s.items() if k not in ("steps", "rounds")}, "rounds": rounds,
                           "steps": {m: s["steps"][m] for m in a.modes}, "threads": THREADS, "precision": "fp32",
                           "val_fraction": VAL_FRACTION, "optimizer": "AdamW fused, betas 0.9/0.95, eps 1e-8, "
                           "weight decay 0.1, constant LR, clip 1.0", "trl_gradient_checkpointing": False,
                           "compile": False},
              "prepare": prep, "rounds": [], "load_avgs": [os.getloadavg()[0]]}
    for r in range(rounds):
        for mode in a.modes:
            warmup, timed = s["steps"][mode]
            order = SIDES[mode] if r % 2 == 0 else SIDES[mode][::-1]
            for side in order:
                res = run_child(side, size, mode, warmup, timed)
                summ = summarise(res, warmup)
                record["rounds"].append({"round": r, "mode": mode, "side": side, **summ, "raw": res})
                record["load_avgs"].append(res["load_avg_1min_at_end"])
                print(f"round {r} {mode:6} {side:11}: {summ['real_tokens_per_s']:8.1f} real tokens/s "
                      f"({summ['computed_tokens_per_s']:8.1f} computed, padding {summ['padding_fraction']:.1%}), "
                      f"peak RSS {gib(summ['peak_rss'])}, loss {res['steps'][0]['loss']:.3f} -> "
                      f"{res['steps'][-1]['loss']:.3f}, child wall {res['wall_s']:.0f} s, "
                      f"load {res['load_avg_1min_at_end']:.1f}", flush=True)
    aggregate(record)
    record["wall_s"] = time.perf_counter() - t_start
    if size == "full":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    print()
    print(table(record))
    for mode, by in record["ratios"].items():
        for side, rt in by.items():
            print(f"{mode}: stagewise / {NAMES[side]}: real tokens/s {rt['real_tokens_per_s']:.2f}x (target >= 1.5x; "
                  f"per CPU-s {rt['real_tokens_per_cpu_s']:.2f}x), "
                  f"peak RSS {rt['peak_rss']:.2f}x (target <= 0.8x)")
    if size == "full" and set(a.modes) == set(MODES):
        TABLE.write_text("# SFT: stagewise vs TRL SFTTrainer (bench/sft.py)\n\n" + table(record))
    print(f"total wall {record['wall_s']:.0f} s" + (f"; appended to {RESULTS.relative_to(ROOT)}" if size == "full" else
                                                      " (--quick: nothing recorded)"))


if __name__ == "__main__":
    main()
