"""RL experiment 11 (2), second design: does RL forget an earlier task less than SFT does?

Claim (Lai et al. 2025, "Reinforcement Fine-Tuning Naturally Mitigates Forgetting in Continual
Post-Training"): after a first task, training a second by RL forgets the first less than SFT does;
a counter-claim says RL without a KL term forgets as much. rl_grpo.py's first design could not test
it: its multiplication-only warm-start erased addition before stage B, and GRPO had ~no reward.

Set-up. Stage A = rl_grpo.py's cached addition model (recipes/rl.yaml's code + addition SFT; it is
reused, never retrained here). Warm-start, shared by every arm, trained once and cached: SFT on a
MIX of addition and multiplication (1..2-digit operands, reversed answers; one `sft.arithmetic`
section with ops [add, mul]) at a cosine-decayed lr, so that it ends with addition kept AND
multiplication partly solved (GRPO then gets reward). Stage B, per arm and seed, trains ONLY
multiplication for B_STEPS steps at B_LR: (i) SFT, (ii) GRPO kl_beta 0, (iii) GRPO kl_beta 0.05 (k3
in the loss, frozen copy of B's start). Measured after B in this process, greedy, on the same
EVAL_PROBLEMS held-out problems for every model: addition exact match (forgetting = warm-start value
- after), multiplication exact match (learning), and the code domain's bits per byte.
Results: results/rl_forgetting.jsonl (a header line, then one line per run), .md and .png, all
generated from the record:  python rl_forgetting.py --tables
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

import _common as c
import rl_grpo as g
import sft_arithmetic as arith

EXP = "rl_forgetting"
RUNS = c.HERE / "runs" / EXP
EVAL_PROBLEMS = 200        # per task; the same problems (generator seed 0) for every model
g.EVAL_PROBLEMS = EVAL_PROBLEMS  # rl_grpo.scores() and post_recipe() read it
WARM_STEPS, WARM_LR, WARM_PROBLEMS = 1500, 3e-3, 12000  # 300 steps: multiplication 3.5% (pilot)
WARM_SCHEDULE = {"name": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1}
MIX = {"ops": ["add", "mul"], "min_digits": 1, "max_digits": 2, "format": "reversed"}
B_STEPS = 100              # every arm: constant lr after 5 warmup steps
B_LR = float(os.environ.get("RL_FORGET_B_LR", "3e-4"))  # 1e-3: a second record, <EXP>_lr0.001
NAME = EXP if B_LR == 3e-4 else f"{EXP}_lr{B_LR:g}"    # the B runs' folder and the record's name
RECORD = c.RESULTS / f"{NAME}.jsonl"
KL = {"kl_beta": 0.05, "kl_estimator": "k3", "kl_in": "loss", "reference": "copy"}
ARMS = (("SFT", "b-sft"), ("GRPO, no KL", "b-grpo"), ("GRPO, KL 0.05", "b-grpo-kl"))
TITLE = ("Forgetting addition while training multiplication: SFT vs GRPO (with and without KL) from a "
         "shared add+mul warm-start (d128 x 2 layers, digit-per-token BPE)")


def spec(name: str, recipe: dict) -> c.Spec:
    path = RUNS / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return c.Spec(name, name, ("--precision.telemetry_every=0",), base=str(path))


def warm_recipe(add_model) -> dict:
    r = g.post_recipe("sft", MIX, add_model, WARM_STEPS, WARM_LR, every=100)
    r["stages"][0]["schedule"] = dict(WARM_SCHEDULE)
    r["sft"]["arithmetic"]["train_count"] = WARM_PROBLEMS  # 1500 steps would repeat 5000 problems ~60 times
    return r


def cached_warm(recipe: dict) -> dict:
    """Trained once (seed 1); reused while its stamp holds the same recipe."""
    run_dir, stamp = RUNS / "warm-s1", RUNS / "warm-s1.json"
    if stamp.is_file() and (run_dir / "final").is_dir():
        have = json.loads(stamp.read_text())
        if have["recipe"] == recipe:
            print(f"  warm-start: cached ({have['wall_s']:.0f}s when trained)", flush=True)
            return {**have, "cached": True, "dir": run_dir}
    u0 = _cpu()
    run = c._train(EXP, spec("warm", recipe), 1)
    out = {"recipe": recipe, "wall_s": run["wall_s"], "cpu_s": round(_cpu() - u0, 1),
           "curve": c.curve(run["metrics"], "exact_match")}
    stamp.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "cached": False, "dir": run_dir}


def _cpu() -> float:
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(w) for w in
                                                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def measure(model_dir, dataset: str) -> dict:
    s = g.scores(model_dir)
    return {"add_em": s["add"], "mul_em": s["mul"], "code_bpb": arith.pretrain_eval(model_dir, dataset)["bpb"]}


def main():
    import torch

    torch.set_num_threads(1)
    print(f"{EXP}:")
    t0, cpu0, load0 = time.perf_counter(), _cpu(), round(os.getloadavg()[0], 2)
    base = g.cached("sftbase", g.base_recipe(), "stages/chat")
    add_model = base["dir"] / "stages" / "chat"
    dataset = json.loads((base["dir"] / "run_info.json").read_text())["dataset"]
    start = measure(add_model, dataset)
    print(f"  addition model: {start}", flush=True)
    warm = cached_warm(warm_recipe(add_model))
    w = warm["dir"] / "final"
    warm_m = measure(w, dataset)
    print(f"  warm-start: {warm_m}", flush=True)
    if "--warm-only" in sys.argv:
        return
    t1 = time.perf_counter()
    recipes = {"b-sft": g.post_recipe("sft", g.MUL, w, B_STEPS, B_LR, every=50),
               "b-grpo": g.post_recipe("rl", g.MUL, w, B_STEPS, B_LR, every=50),
               "b-grpo-kl": g.post_recipe("rl", g.MUL, w, B_STEPS, B_LR, every=50, rl=KL)}

    def one(job):
        label, name, seed = job
        run = c._train(NAME, c.Spec(label, name, ("--precision.telemetry_every=0",),
                                   base=str(spec(name, recipes[name]).base)), seed)
        run["final"] = measure(run["dir"] / "final", dataset)
        print(f"  {name}-s{seed}: {run['final']}", flush=True)
        return run

    seeds = c.SEEDS
    with ThreadPoolExecutor(c.WORKERS) as pool:
        runs = list(pool.map(one, [(lab, name, s) for s in seeds for lab, name in ARMS]))
    header = {"experiment": NAME, "title": TITLE, "date": time.strftime("%Y-%m-%d"), "machine": c.machine(),
              "workers": c.WORKERS, "seeds": list(seeds),
              "settings": {"warm_steps": WARM_STEPS, "warm_lr": WARM_LR, "warm_schedule": WARM_SCHEDULE, "mix": MIX,
                           "mul": g.MUL, "add": g.ADD, "b_steps": B_STEPS, "b_lr": B_LR, "warmup": g.WARMUP,
                           "kl": KL, "eval_problems": EVAL_PROBLEMS,
                           "rollout": "16 prompts x 8 completions, temperature 1, 6 new tokens",
                           "sft_batch": "32 packed rows of 64 tokens"},
              "base": {**start, "wall_s": base["wall_s"], "cached": base["cached"]},
              "warm": {**warm_m, "wall_s": warm["wall_s"], "cpu_s": warm.get("cpu_s"), "cached": warm["cached"],
                       "curve": warm["curve"]},
              "wall_total_s": round(time.perf_counter() - t0, 1), "wall_b_s": round(time.perf_counter() - t1, 1),
              "cpu_total_s": round(_cpu() - cpu0, 1),
              "load_average_1min": {"start": load0, "end": round(os.getloadavg()[0], 2)}}
    lines = [header] + [{"label": r["label"], "seed": r["seed"], "wall_s": r["wall_s"], "final": r["final"],
                         "curves": {"exact_match": c.curve(r["metrics"], "exact_match"),
                                    **({"reward": c.curve(r["metrics"], "reward/mean")} if "grpo" in r["name"] else {})}}
                        for r in runs]
    RECORD.write_text("".join(json.dumps(x, default=c._refuse) + "\n" for x in lines))
    write_outputs()


# ------------------------------------------------------------------ table and plot (from the record alone)

def load() -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in RECORD.read_text().splitlines() if x.strip()]
    return lines[0], lines[1:]


def vals(runs, label, key, scale=100.0):
    return [scale * r["final"][key] for r in sorted(runs, key=lambda r: r["seed"]) if r["label"] == label]


def table(header: dict, runs: list[dict]) -> str:
    s, b, w = header["settings"], header["base"], header["warm"]
    wa, wm = 100 * w["add_em"], 100 * w["mul_em"]
    rows = [["A: addition model", f"{100 * b['add_em']:.1f}", "—", f"{100 * b['mul_em']:.1f}", "—",
             f"{b['code_bpb']:.4f}"],
            [f"warm-start: {s['warm_steps']} SFT steps on add+mul", f"{wa:.1f}", "—", f"{wm:.1f}", "—",
             f"{w['code_bpb']:.4f}"]]
    for lab, _ in ARMS:
        add, mul = vals(runs, lab, "add_em"), vals(runs, lab, "mul_em")
        rows.append([f"B: {lab}", c.cell(add, 1), c.cell([wa - a for a in add], 1), c.cell(mul, 1),
                     c.cell([m - wm for m in mul], 1), c.cell(vals(runs, lab, "code_bpb", 1), 4)])
    t1 = c.markdown_table(["model", "addition exact match %", "addition forgotten in B (points)",
                           "multiplication exact match %", "multiplication gained in B (points)", "code val bpb"],
                          rows)
    pairs = []
    for a, r in (("GRPO, no KL", "SFT"), ("GRPO, KL 0.05", "SFT"), ("GRPO, KL 0.05", "GRPO, no KL")):
        pairs.append([f"{a} − {r}", *(c.delta_cell(vals(runs, a, k, sc), vals(runs, r, k, sc), d)
                                      for k, sc, d in (("add_em", 100, 1), ("mul_em", 100, 1), ("code_bpb", 1, 4)))])
    t2 = c.markdown_table(["paired difference (same seed)", "addition exact match (points)",
                           "multiplication exact match (points)", "code val bpb"], pairs)
    every = [[r["label"], r["seed"], f"{100 * r['final']['add_em']:.1f}", f"{100 * r['final']['mul_em']:.1f}",
              f"{r['final']['code_bpb']:.4f}", f"{r['wall_s']:.0f}"] for r in runs]
    t4 = c.markdown_table(["arm", "seed", "addition %", "multiplication %", "code val bpb", "wall s"], every)
    m, load = header["machine"], header["load_average_1min"]
    return (
        f"# {header['title']}\n\nExact match (greedy) on the same {s['eval_problems']} held-out problems per task "
        f"for every model; B rows: mean ± std over seeds {', '.join(map(str, header['seeds']))}.\n\n{t1}\n\n{t2}\n\n## Every run\n\n{t4}\n\n"
        f"Settings: A = rl_grpo.py's cached addition model (recipes/rl.yaml code 120 steps + addition SFT 500 steps "
        f"at 3e-3). Warm-start: {s['warm_steps']} SFT steps at {s['warm_lr']:g}, cosine to 0.1× after 20 warmup "
        f"steps, on ops {s['mix']['ops']} ({s['mix']['min_digits']}..{s['mix']['max_digits']}-digit operands, "
        f"reversed), trained once ({w['wall_s']:.0f} s wall"
        f"{'' if w.get('cpu_s') is None else ', %.0f s CPU' % w['cpu_s']}"
        f", {'cached' if w['cached'] else 'trained in this run'}). "
        f"B: {s['b_steps']} steps per arm on multiplication only, lr {s['b_lr']:g} constant after {s['warmup']} "
        f"warmup steps; GRPO: {s['rollout']}, one optimizer step per rollout; SFT: {s['sft_batch']}; KL arm: "
        f"kl_beta {s['kl']['kl_beta']:g}, k3 in the loss, frozen fp32 copy of B's start. Code val bpb: `stagewise "
        f"eval` on 32,768 tokens of the pre-training validation split. Δ and \"effect\": the noise rule "
        f"(experiments/README.md). Measured {header['date']} on {m['cpu']} ({m['cores']} cores, shared with another "
        f"job), torch {m['torch']}, {header['workers']} runs at a time, one thread each; this script "
        f"{header['wall_total_s'] / 60:.1f} min wall (B {header['wall_b_s'] / 60:.1f}), "
        f"{header['cpu_total_s'] / 60:.1f} min CPU; 1-minute load {load['start']:g} → {load['end']:g}. "
        f"Raw numbers: [{NAME}.jsonl]({NAME}.jsonl).\n")


def plot(header: dict, runs: list[dict], path) -> None:
    fig, axes = c.figure(2)
    wa, wm = 100 * header["warm"]["add_em"], 100 * header["warm"]["mul_em"]
    for i, (lab, _) in enumerate(ARMS):
        f = [wa - a for a in vals(runs, lab, "add_em")]
        gain = [m - wm for m in vals(runs, lab, "mul_em")]
        axes[0].scatter(gain, f, color=f"C{i}", label=lab)
    axes[0].axhline(0, color="grey", linewidth=0.5)
    axes[0].axvline(0, color="grey", linewidth=0.5)
    axes[0].set(xlabel="multiplication gained in B (points)", ylabel="addition forgotten in B (points)",
                title="each run (one point per seed)")
    axes[0].legend(fontsize=8)
    labels = [lab for lab, _ in ARMS]
    for k, (key, name) in enumerate((("add_em", "addition"), ("mul_em", "multiplication"))):
        ms = [c.mean_std(vals(runs, lab, key)) for lab in labels]
        axes[1].bar([i + 0.4 * k for i in range(3)], [v[0] for v in ms], 0.4, yerr=[v[1] for v in ms],
                    label=f"{name} after B", color=f"C{k + 3}")
    axes[1].axhline(wa, color="C3", linestyle="--", label="addition, warm-start")
    axes[1].axhline(wm, color="C4", linestyle="--", label="multiplication, warm-start")
    axes[1].set_xticks([i + 0.2 for i in range(3)], labels)
    axes[1].set(ylabel="exact match %", title="after stage B (mean ± std over seeds)")
    axes[1].legend(fontsize=8)
    c.save_figure(fig, path)


def write_outputs() -> None:
    header, runs = load()
    md = c.RESULTS / f"{NAME}.md"
    md.write_text(table(header, runs))
    print(md.read_text())
    plot(header, runs, c.RESULTS / f"{NAME}.png")


if __name__ == "__main__":
    write_outputs() if "--tables" in sys.argv else main()
