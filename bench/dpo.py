"""DPO: stagewise's `dpo` kind against TRL's DPOTrainer, on the same model, pairs, batches and settings.

    python bench/dpo.py                          # both configurations, 2 alternating rounds (~11 min here)
    python bench/dpo.py --configs llama --rounds 1 --no-record     # a pilot

Every run is a fresh child process (stagewise, TRL, stagewise, TRL, ...; the order flips each
round), so its peak RSS (VmHWM) is its own. Two configurations:

  llama   a small stagewise Llama (d_model 256, 4 layers, 4 heads, tied embeddings, a stagewise BPE of
          8192 tokens) pre-trained 20 steps on python-stdlib by `stagewise run`, then `stagewise
          export-hf`; both sides start from that export (identical weights, tokenizer and template).
          Full fine-tuning on python-docstrings pairs. References: stagewise `copy` (a frozen copy, bf16
          storage under bf16-mixed) against TRL's default (a second fp32 model loaded from the same
          path), and stagewise `precomputed` against TRL precompute_ref_log_probs=True; plus stagewise
          with dpo.packing as an extra row (its pairs per step vary, so only its pairs/s compares).
  gemma   google/gemma-3-270m (the PyPI GGUF): stagewise starts from bench/finetune_gemma.py's import
          of it, TRL from transformers' own dequantization of the same GGUF, saved once as fp32
          safetensors. LoRA r 16, alpha 32, dropout 0 on q/k/v/o/gate/up/down; stagewise reference
          adapters-off, TRL peft_config (it disables the adapter for the reference). Arithmetic pairs:
          a step over docstring pairs takes minutes on 2 cores, at a 262k-token head.

Data: stagewise's built-in preference pairs, train split: python-docstrings (chosen = the function's
real body, rejected = another function's body from the same module) for llama, those whose
prompt + response fit data.seq_len + 1 tokens (neither side truncates); arithmetic (chosen = the sum,
rejected = a plausible wrong one) for gemma. One JSONL of conversational rows {"prompt", "chosen",
"rejected"} both sides read. The chat template is ChatML (llama) or Gemma's turn format (gemma)
without the newline after the last end-of-turn token, written as chat_template.jinja into the model
directory both sides read: TRL's completion (prompt + response rendered, minus the prompt rendered
with the generation prompt) is then exactly what stagewise trains (content + end-of-turn). Every TRL
child compares its tokenized dataset with stagewise's ids and trained positions (`parity`).

Same batches: stagewise holds out dpo.val_fraction of the rows by hash and lays out its train pairs
by (seed, epoch); TRL reads exactly those train pairs in that order with sequential sampling, so
step k of both sides trains the same batch_size pairs, padded to the longest rounded up to 32
(stagewise's rule; TRL pad_to_multiple_of=32). The stagewise child checks its batches are those.

Settings, equal on both sides: bf16 compute as stagewise's bf16-mixed does it on this CPU (fp32 master
weights, autocast bf16, bf16 GEMMs emulated as fp32 GEMMs on bf16-rounded values: this CPU has no
native bf16 GEMM and torch's reference bf16 kernels run 10x+ slower, docs/precision.md). stagewise:
precision bf16-mixed; TRL: bf16=False and the same context (bf16_compute below) around its loss
(compute_loss_context_manager) and its reference precompute. beta 0.1, sigmoid loss, AdamW fused
(betas 0.9/0.999, eps 1e-8, weight decay 0), constant LR, gradient clipping 1.0, batch_size pairs per
step (no accumulation), no evaluation, logging or checkpointing during the steps (stagewise saves
only at the end, after the timing), dataloader workers 0, gradient checkpointing off (TRL's default is
on), eager (no compile), 2 threads.

Metric: pairs/s of a step = batch_size over its wall time, step end to step end (data, both
forwards, backward, clipping, optimizer, the frameworks' per-step bookkeeping), median over the
steps after the first `warmup`; stagewise's own step_time_s (metrics.jsonl) is kept beside it, and
pairs per CPU-second (less sensitive to other jobs on a shared machine). Peak RSS: the child's VmHWM
after its last step (model load, data preparation and a precompute included; stagewise's end-of-run
evaluation and checkpoint excluded). Ratios: stagewise over TRL per round (the two ran back to back),
median over rounds. Targets: >= 1.5x pairs/s, <= 0.7x peak RSS. Appends one record to
bench/results/dpo.jsonl (--no-record: none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_gemma import CACHE as GEMMA_CACHE, ROOT, prepare as prepare_gemma  # noqa: E402
from dpo_children import (  # noqa: E402
    CONFIGS, LLAMA, MEMORY_TARGET, RESULTS, SEED, SPEED_TARGET, TARGETS, TEMPLATES, THREADS, VAL_FRACTION, paths, sh,
    stagewise_child, trl_child,
)


def prepare_model(config: str) -> dict:
    """The model directory both sides read (stagewise's weights, the tokenizer, the template above) and
    the HF weights TRL loads (the same directory for llama); made once."""
    p = paths(config)
    p["dir"].mkdir(parents=True, exist_ok=True)
    if config == "llama":
        base = p["dir"] / "base"
        if not (base / "final").is_dir():
            shutil.rmtree(base, ignore_errors=True)
            s = LLAMA
            recipe = p["dir"] / "pretrain.yaml"
            recipe.write_text(f"""name: base
out_dir: {p['dir']}
seed: {SEED}
threads: {THREADS}
model: {{d_model: {s['d_model']}, n_layers: {s['n_layers']}, n_heads: {s['n_heads']}, max_seq_len: {s['max_seq_len']}}}
data:
  sources: [{{kind: python-stdlib}}]
  tokenizer: {{vocab_size: {s['vocab']}, train_bytes: {s['tok_bytes']}}}
  seq_len: {s['max_seq_len']}
  cache_dir: {p['dir'] / 'data_cache'}
train: {{steps: {s['pretrain_steps']}, batch_size: 8}}
optim: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup_steps: 1}}
precision: {{mode: fp32, telemetry_every: 0}}
eval: {{every: 0, batches: 1}}
checkpoint: {{every: 0, keep_last: 1}}
log: {{progress: plain, every: 5}}
""")
            print(f"prepare: pre-training the llama ({s['pretrain_steps']} steps) -> {base}", flush=True)
            sh([sys.executable, "-m", "stagewise", "run", recipe])
        if not (p["model"] / "config.json").is_file():
            shutil.rmtree(p["model"], ignore_errors=True)
            sh([sys.executable, "-m", "stagewise", "export-hf", base, p["model"]])
        out = {"hf_weights": str(p["model"])}
    else:
        imported, _ = prepare_gemma()
        if not (p["model"] / "config.json").exists():
            p["model"].mkdir(parents=True, exist_ok=True)
            for f in imported.iterdir():  # the imported files, linked: only the template is this bench's own
                (p["model"] / f.name).symlink_to(f.resolve())
        hf = p["dir"] / "hf"
        if not (hf / "config.json").is_file():
            # transformers' own dequantization of the GGUF (not stagewise's import), saved once as fp32
            # safetensors: loading the GGUF takes a minute per child, and Trainer refuses to train a model
            # marked GGUF-quantized although its weights are dequantized fp32 on load
            import torch
            from transformers import AutoModelForCausalLM

            gguf = next((GEMMA_CACHE / "gguf").glob("*.gguf"))
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(hf)
        out = {"hf_weights": str(hf)}
    (p["model"] / "chat_template.jinja").write_text(TEMPLATES[config])
    # export-hf writes ChatML into tokenizer_config.json; the .jinja wins on both sides, but leave one template
    tc = p["model"] / "tokenizer_config.json"
    tc_json = json.loads(tc.read_text())
    if tc_json.pop("chat_template", None) is not None:
        tc.unlink()  # may be a link into the imported model: replace it, never write through it
        tc.write_text(json.dumps(tc_json, indent=2))
    return out


def prepare_data(config: str) -> dict:
    """pairs.jsonl (what stagewise reads), pairs_trl.jsonl (stagewise's train pairs in the order it
    trains them: what TRL reads) and expected.json (stagewise's ids and trained mask of every
    sequence, which the TRL child compares its tokenization with)."""
    import numpy as np

    from stagewise.config.loader import from_dict
    from stagewise.config.schema import DPOConfig
    from stagewise.data.chat import require_template
    from stagewise.data.preference import arithmetic_rows, docstring_rows, load_preference_data
    from stagewise.data.preference_batches import PreferenceSource
    from stagewise.data.sft_data import row_split
    from stagewise.data.tokenizer import Tokenizer

    c, p = CONFIGS[config], paths(config)
    tok = Tokenizer.load(p["model"] / "tokenizer.json")
    template = require_template(tok, "bench")
    need = (c["warmup"] + c["timed"]) * c["batch"]
    rows, skipped, held_out = [], 0, 0
    rng = np.random.default_rng(SEED)
    if c["data"] == "arithmetic":
        candidates = [r for split, r in arithmetic_rows(4 * need, 1, ("add",), (1, 3), "plain", 0) if split == "train"]
    else:
        candidates = [r for split, r in docstring_rows(4000) if split == "train"]
    for i in rng.permutation(len(candidates)):
        r = candidates[int(i)]
        lens = [len(template.encode(tok, r.prompt + resp, only_last=True)[0]) for resp in (r.first, r.second)]
        if max(lens) > c["seq"] + 1:
            skipped += 1
            continue
        rows.append({"prompt": r.prompt, "chosen": r.first, "rejected": r.second})
        # stagewise names a JSONL row PATH:LINE and holds it out by a hash of that name
        held_out += row_split(f"{p['pairs']}:{len(rows)}", VAL_FRACTION) == "val"
        if len(rows) - held_out >= need and held_out >= 2:
            break
    with p["pairs"].open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    dpo = from_dict(DPOConfig, {"data": [{"kind": "jsonl", "path": str(p["pairs"])}], "val_fraction": VAL_FRACTION,
                                "truncation": "error", "packing": False})
    data = load_preference_data(dpo, tok, c["seq"], log=lambda m: None)
    assert len(data.train) >= need and len(data.val) == held_out, (len(data.train), len(data.val), held_out)
    source = PreferenceSource(data.train, c["seq"], c["batch"], SEED, tok.eos_id, False)
    # the whole first epoch, so that TRL's precompute covers what stagewise's does (bar val and the remainder)
    order = [i for batch in source._epoch_layout() for i in batch]
    expected, out_rows = [], []
    for i in order:
        line = int(data.train[i].source.rsplit(":", 1)[1])
        row = rows[line - 1]
        out_rows.append(row)
        seqs = []
        for key in ("chosen", "rejected"):
            ids, mask = template.encode(tok, row["prompt"] + row[key], only_last=True)
            seqs.append({"ids": ids, "mask": [int(m) for m in mask]})
        expected.append(seqs)
    with p["trl"].open("w") as f:
        for row in out_rows:
            f.write(json.dumps(row) + "\n")
    p["expected"].write_text(json.dumps(expected))
    lengths = [len(s["ids"]) for pair in expected for s in pair]
    return {"rows_written": len(rows), "skipped_longer_than_seq": skipped, "train_pairs": len(data.train),
            "val_pairs": len(data.val), "trl_pairs": len(order), "pairs_trained_per_child": need,
            "mean_tokens_per_sequence": statistics.mean(lengths), "max_tokens_per_sequence": max(lengths)}


# ----------------------------------------------------------------------------- the children

# ----------------------------------------------------------------------------- the parent

def run_child(side: str, config: str, variant: str) -> dict:
    t0 = time.perf_counter()
    out = sh([sys.executable, __file__, "--child", side, "--config", config, "--variant", variant,
              "--timed", CONFIGS[config]["timed"]],
             env={**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"})
    res = json.loads(out.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    res["load_avg_1min_at_end"] = os.getloadavg()[0]
    return res


def summarise(res: dict, warmup: int) -> dict:
    timed = res["steps"][warmup:]
    return {"pairs_per_s": statistics.median(s["pairs"] / s["time"] for s in timed),
            "pairs_per_s_total": sum(s["pairs"] for s in timed) / sum(s["time"] for s in timed),
            "pairs_per_cpu_s": sum(s["pairs"] for s in timed) / sum(s["cpu"] for s in timed),
            "peak_rss": res["peak_rss"], "rss_before_train": res["rss_before_train"],
            "step0_loss": res["steps"][0]["loss"], "step0_logps_chosen": res["steps"][0]["logps/chosen"],
            "last_loss": res["steps"][-1]["loss"]}


def machine() -> dict:
    import peft
    import torch
    import transformers
    import trl

    info = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split())
    return {"cpu": name.group(1).strip() if name else "unknown", "cores": os.cpu_count(),
            "flags_of_note": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "load_avg_at_start": os.getloadavg()[0], "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(record: dict) -> str:
    lines = ["| config | stagewise reference | TRL reference | stagewise pairs/s | TRL pairs/s | ratio (rounds) | "
             "stagewise peak RSS | TRL peak RSS | ratio | step-0 loss sw / TRL | step-0 logps/chosen sw / TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, res in record["configs"].items():
        for pair in res["pairs"]:
            s, t = pair["stagewise"], pair["trl"]
            if t is None:
                lines.append(f"| {config} | {pair['sw_variant']} | — | {s['pairs_per_s']:.2f} | — | — | "
                             f"{gib(s['peak_rss'])} | — | — | {s['step0_loss']:.4f} | — |")
                continue
            rounds = ", ".join(f"{x:.2f}" for x in pair["speed_ratio_per_round"])
            lines.append(f"| {config} | {pair['sw_variant']} | {pair['trl_variant']} | {s['pairs_per_s']:.2f} | "
                         f"{t['pairs_per_s']:.2f} | **{pair['speed_ratio']:.2f}x** ({rounds}) | {gib(s['peak_rss'])} | "
                         f"{gib(t['peak_rss'])} | **{pair['memory_ratio']:.2f}x** | {s['step0_loss']:.4f} / "
                         f"{t['step0_loss']:.4f} | {s['step0_logps_chosen']:.2f} / {t['step0_logps_chosen']:.2f} |")
    return "\n".join(lines)


def aggregate(config: str, children: list) -> list:
    """Per (stagewise, TRL) pair: medians over rounds of each side and of the per-round ratios."""
    c = CONFIGS[config]
    out = []
    med = lambda rows, k: statistics.median(r["summary"][k] for r in rows)  # noqa: E731
    keys = ("pairs_per_s", "pairs_per_s_total", "pairs_per_cpu_s", "peak_rss", "rss_before_train", "step0_loss",
            "step0_logps_chosen", "last_loss")
    for sw_v, trl_v in c["pairs"] + [(e, None) for e in c["extra"]]:
        sw = [x for x in children if x["side"] == "stagewise" and x["variant"] == sw_v]
        tr = [x for x in children if x["side"] == "trl" and x["variant"] == trl_v]
        entry = {"sw_variant": sw_v, "trl_variant": trl_v, "stagewise": {k: med(sw, k) for k in keys},
                 "trl": {k: med(tr, k) for k in keys} if tr else None}
        if tr:
            speed = [a["summary"]["pairs_per_s"] / b["summary"]["pairs_per_s"] for a, b in zip(sw, tr)]
            mem = [a["summary"]["peak_rss"] / b["summary"]["peak_rss"] for a, b in zip(sw, tr)]
            entry.update(speed_ratio=statistics.median(speed), speed_ratio_per_round=speed,
                         memory_ratio=statistics.median(mem), memory_ratio_per_round=mem,
                         speed_target_met=statistics.median(speed) >= SPEED_TARGET,
                         memory_target_met=statistics.median(mem) <= MEMORY_TARGET)
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timed", type=int, help="timed steps per child (default: each configuration's)")
    ap.add_argument("--no-record", action="store_true", help="print the table, append nothing")
    ap.add_argument("--child", choices=["stagewise", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for c in CONFIGS.values():
        c["timed"] = a.timed or c["timed"]
    if a.child:
        res = (stagewise_child if a.child == "stagewise" else trl_child)(a.config, a.variant)
        print(json.dumps(res))
        return
    t_start = time.perf_counter()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "settings": {"configs": {k: CONFIGS[k] for k in a.configs}, "llama_model": LLAMA, "rounds": a.rounds,
                           "threads": THREADS, "seed": SEED, "val_fraction": VAL_FRACTION,
                           "precision": "bf16-mixed (stagewise's CPU bf16 emulation on both sides)",
                           "optimizer": "AdamW fused, betas 0.9/0.999, eps 1e-8, weight decay 0, constant LR, "
                           "clip 1.0", "beta": 0.1, "loss": "sigmoid", "lora": {"r": 16, "alpha": 32, "dropout": 0,
                                                                                  "targets": TARGETS},
                           "trl": {"gradient_checkpointing": False, "bf16": False, "pad_to_multiple_of": 32,
                                   "train_sampling_strategy": "sequential"},
                           "targets": {"pairs_per_s": SPEED_TARGET, "peak_rss": MEMORY_TARGET}},
              "configs": {}}
    for config in a.configs:
        p = paths(config)
        prep = {"model": prepare_model(config)}
        prep["data"] = prepare_data(config)
        p["prep"].write_text(json.dumps(prep, indent=1))
        print(f"{config}: {json.dumps(prep)}", flush=True)
        c = CONFIGS[config]
        children = []
        for r in range(a.rounds):
            runs = [(("stagewise", s), ("trl", t)) for s, t in c["pairs"]] + [(("stagewise", e),) for e in c["extra"]]
            for group in runs:
                for side, variant in group if r % 2 == 0 else group[::-1]:
                    res = run_child(side, config, variant)
                    summ = summarise(res, c["warmup"])
                    children.append({"round": r, "side": side, "variant": variant, "summary": summ, "raw": res})
                    parity = res.get("parity")
                    print(f"{config} round {r} {side:9} {variant:12}: {summ['pairs_per_s']:6.2f} pairs/s "
                          f"(total {summ['pairs_per_s_total']:.2f}), peak RSS {gib(summ['peak_rss'])}, loss "
                          f"{summ['step0_loss']:.4f} -> {summ['last_loss']:.4f}, logps/chosen "
                          f"{summ['step0_logps_chosen']:.2f}, wall {res['wall_s']:.0f} s"
                          + (f", parity {parity}" if parity else ""), flush=True)
        record["configs"][config] = {"prepare": prep, "pairs": aggregate(config, children), "children": children}
    record["wall_s"] = time.perf_counter() - t_start
    record["load_avg_at_end"] = os.getloadavg()[0]
    print()
    print(table(record))
    for config, res in record["configs"].items():
        for pair in res["pairs"]:
            if pair["trl"] is not None:
                print(f"{config} {pair['sw_variant']} vs TRL {pair['trl_variant']}: {pair['speed_ratio']:.2f}x pairs/s "
                      f"(target >= {SPEED_TARGET}x: {'met' if pair['speed_target_met'] else 'NOT met'}), "
                      f"{pair['memory_ratio']:.2f}x peak RSS (target <= {MEMORY_TARGET}x: "
                      f"{'met' if pair['memory_target_met'] else 'NOT met'})")
    if not a.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    where = "" if a.no_record else f"; appended to {RESULTS.relative_to(ROOT)}"
    print(f"total wall {record['wall_s']:.0f} s{where}")


if __name__ == "__main__":
    main()
