"""RL experiment 11: GRPO after SFT on arithmetic, and forgetting in sequential post-training, SFT vs RL.

(1) Claim (DeepSeekMath's GRPO; recipes/rl.yaml): GRPO from an SFT'd small model on a verifiable
    task raises its exact-match accuracy. Set-up: ONE model, recipes/rl.yaml's first two stages
    (120 steps of code pre-training, 500 steps of SFT on 1..2-digit reversed addition with a
    digit-per-token BPE), trained once and cached. Per seed, from its SFT export (`init_from`):
    (a) GRPO for RL_STEPS steps (16 prompts x 8 completions, lr 1e-4 constant), (b) a CONTROL: the
    same number of SFT steps at the same lr on the same problems, so that "more low-lr training"
    is separated from what RL adds. The seed sets the rollout sampling and prompt order (GRPO) or
    the data order (SFT); the problems and the 100 held-out evaluation problems are the same for
    every run (generator seed 0).
(2) Claim (Lai et al. 2025, "Reinforcement Fine-Tuning Naturally Mitigates Forgetting in Continual
    Post-Training"): after a first task, training a second by RL forgets the first less than SFT
    does; a counter-claim says RL without a KL term forgets as much or more. Set-up: stage A is (1)'s
    addition model; stage B trains multiplication (1..2-digit operands, reversed answers) by
    (i) SFT, (ii) GRPO with kl_beta 0, (iii) GRPO with kl_beta 0.05 (k3 in the loss, frozen copy of
    the stage's start as reference). The addition model answers ~0% of the multiplications right,
    so GRPO would see no reward signal (every group's rewards agree, advantage 0): every arm
    therefore starts from ONE shared short SFT warm-start on multiplication (WARM_STEPS steps at the
    SFT lr), and stage B's arms differ only in their objective, at the same lr and steps. Measured
    after B, in this process on fixed problems: exact match on addition (forgetting: the drop from
    the addition model, and from the warm-start) and on multiplication (learning); and the code
    domain's validation bits per byte (`stagewise eval`, experiment 8's windows). This FIRST design of
    (2) could not test the claim (the warm-start erased addition; GRPO had ~no reward); the second
    design, a shared add+mul warm-start, is rl_forgetting.py.
Results: results/rl_grpo.jsonl (a header line, then one line per run), results/rl_grpo.md and .png,
all generated from the record:  python rl_grpo.py --tables
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
import sft_arithmetic as arith

EXP = "rl_grpo"
RUNS = c.HERE / "runs" / EXP
RECORD = c.RESULTS / f"{EXP}.jsonl"
SEEDS_FORGET = tuple(int(s) for s in os.environ.get("RL_FORGET_SEEDS", "1,2").split(","))
RL_STEPS = 60              # (1): GRPO and control steps (150 did not fit the 40-minute budget on the shared CPU)
B_STEPS = 50               # (2): stage B steps of every arm (sized to the time budget)
B_LR = 3e-4                # (2): stage B lr of every arm: 50 steps at 1e-4 would barely move the weights
LR = 1e-4                  # recipes/rl.yaml's GRPO lr, constant after WARMUP steps, for every post-training arm
WARMUP = 5
EVAL_EVERY = 15            # (1); stage B evaluates every 25
EVAL_PROBLEMS = 100
WARM_STEPS = 60            # (2): the shared SFT warm-start on multiplication
WARM_LR = 3e-3             # the addition SFT's lr
KL_BETA = 0.05
ADD = {"ops": ["add"], "min_digits": 1, "max_digits": 2, "format": "reversed"}
MUL = {"ops": ["mul"], "min_digits": 1, "max_digits": 2, "format": "reversed"}  # 1x1 has only 10 val problems
ARMS1 = (("GRPO", "grpo"), ("SFT control", "sftctl"))
ARMS2 = (("SFT", "b-sft"), ("GRPO, no KL", "b-grpo"), ("GRPO, KL 0.05", "b-grpo-kl"))
TITLE = ("GRPO after SFT on 1..2-digit reversed addition, and forgetting when multiplication follows: "
         "SFT vs GRPO (d128 x 2 layers, digit-per-token BPE)")


def base_recipe() -> dict:
    """recipes/rl.yaml without its grpo stage: code 120 steps, then SFT 500 steps on addition."""
    r = yaml.safe_load((c.REPO / "recipes" / "rl.yaml").read_text())
    r["stages"] = r["stages"][:2]
    r.pop("sample", None)
    r["eval"], r["checkpoint"] = {"every": 100, "batches": 2}, {"every": 0, "keep_last": 1}
    return r


def post_recipe(kind: str, task: dict, init_from, steps: int, lr: float, rl: dict | None = None,
                every: int = EVAL_EVERY) -> dict:
    """One post-training stage from an export: `sft` on the task's problems or `rl` on the same task."""
    arith_cfg = {**task, "train_count": 5000, "val_count": EVAL_PROBLEMS, "seed": 0}
    stage = {"name": "post", "kind": kind, "steps": steps, "init_from": str(init_from),
             "optim": {"lr": lr}, "schedule": {"name": "constant", "warmup_steps": WARMUP}}
    if kind == "sft":
        stage["sft"] = {"data": [{"kind": "arithmetic"}]}
    return {"name": "exp", "seed": 1, "threads": 1, "data": {"seq_len": 64}, "train": {"batch_size": 32},
            "precision": {"mode": "fp32", "telemetry_every": 0}, "eval": {"every": every, "batches": 2},
            "checkpoint": {"every": 0, "keep_last": 1}, "log": {"every": 25},
            "sft": {"arithmetic": arith_cfg, "eval_generate": EVAL_PROBLEMS, "eval_max_new_tokens": 6},
            "rl": {"arithmetic": arith_cfg, "train_problems": 4000, "eval_problems": EVAL_PROBLEMS,
                   "prompts_per_rollout": 16, "group_size": 8, "max_new_tokens": 6, "temperature": 1.0,
                   "algorithm": "grpo", **(rl or {})},
            "stages": [stage]}


def spec(label: str, name: str, recipe: dict) -> c.Spec:
    path = RUNS / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return c.Spec(label, name, ("--precision.telemetry_every=0",), base=str(path))


def cached(name: str, recipe: dict, export: str) -> dict:
    """Train once (seed 1); reused while its stamp holds the same recipe."""
    run_dir, seed = RUNS / f"{name}-s1", 1
    stamp = RUNS / f"{name}-s1.json"
    if stamp.is_file() and (run_dir / export).is_dir():
        have = json.loads(stamp.read_text())
        if have["recipe"] == recipe:
            print(f"  {name}: cached ({have['wall_s']:.0f}s when trained)", flush=True)
            return {**have, "cached": True, "dir": run_dir}
    run = c._train(EXP, spec(name, name, recipe), seed)
    out = {"recipe": recipe, "wall_s": run["wall_s"], "curve": c.curve(run["metrics"], "exact_match")}
    stamp.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "cached": False, "dir": run_dir}


_PROBLEMS: dict = {}


def scores(model_dir) -> dict:
    """Greedy exact match on the same 100 held-out addition and multiplication problems for every model."""
    import torch

    from stagewise import rundir
    from stagewise.config.schema import PrecisionConfig
    from stagewise.data.chat import require_template
    from stagewise.precision import build_precision
    from stagewise.rl.tasks import build_task
    from stagewise.train.rl_kind import task_scores

    model, tok = rundir.load_model(model_dir, torch.device("cpu"))[:2]
    prec = build_precision(PrecisionConfig(mode="fp32"), torch.device("cpu"), 0)
    out = {}
    for key, task_cfg in (("add", ADD), ("mul", MUL)):
        if key not in _PROBLEMS:
            task = build_task("arithmetic", dict(task_cfg))
            _PROBLEMS[key] = (task, task.problems("val", EVAL_PROBLEMS, 0))
        task, probs = _PROBLEMS[key]
        out[key] = task_scores(model, prec, tok, require_template(tok, "rl_grpo"), task, probs, 6)["exact_match"]
    return out


def run_arms(arms, recipes, seeds, dataset, code: bool) -> list[dict]:
    def one(job):
        label, name, seed = job
        run = c._train(EXP, spec(label, name, recipes[name]), seed)
        final = run["dir"] / "final"
        run["scores"] = scores(final)
        run["code"] = arith.pretrain_eval(final, dataset) if code else {"bpb": None, "loss": None}
        return run

    with ThreadPoolExecutor(c.WORKERS) as pool:
        return list(pool.map(one, [(lab, name, s) for lab, name in arms for s in seeds]))


def line(part: str, run: dict, key: str) -> dict:
    return {"part": part, "label": run["label"], "seed": run["seed"], "wall_s": run["wall_s"],
            "final": {**{f"{k}_em": v for k, v in run["scores"].items()}, "code_bpb": run["code"]["bpb"],
                      "code_loss": run["code"]["loss"]},
            "curves": {"exact_match": c.curve(run["metrics"], "exact_match"),
                       **({"reward": c.curve(run["metrics"], "reward/mean")} if key == "rl" else {})}}


def main():
    import torch

    torch.set_num_threads(1)
    print(f"{EXP}:")
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    base = cached("sftbase", base_recipe(), "stages/chat")
    add_model = base["dir"] / "stages" / "chat"
    dataset = json.loads((base["dir"] / "run_info.json").read_text())["dataset"]
    start = {"scores": scores(add_model), "code": arith.pretrain_eval(add_model, dataset)}
    code_model = {"code": arith.pretrain_eval(base["dir"] / "stages" / "code", dataset)}
    print(f"  addition model: {start}", flush=True)
    t1 = time.perf_counter()
    rec1 = {"grpo": post_recipe("rl", ADD, add_model, RL_STEPS, LR), "sftctl": post_recipe("sft", ADD, add_model,
                                                                                             RL_STEPS, LR)}
    runs1 = run_arms(ARMS1, rec1, c.SEEDS, dataset, code=False)
    t2 = time.perf_counter()
    info = {"t0": t0, "t1": t1, "t2": t2, "load0": load0, "base": base, "start": start, "code_model": code_model}
    save(info, runs1, [], None)  # part (1) is kept even if part (2) does not finish
    warm = cached("mulwarm", post_recipe("sft", MUL, add_model, WARM_STEPS, WARM_LR, every=30), "final")
    warm_scores = {"scores": scores(warm["dir"] / "final"), "code": arith.pretrain_eval(warm["dir"] / "final", dataset)}
    print(f"  multiplication warm-start: {warm_scores}", flush=True)
    w = warm["dir"] / "final"
    rec2 = {"b-sft": post_recipe("sft", MUL, w, B_STEPS, B_LR, every=25), "b-grpo": post_recipe("rl", MUL, w, B_STEPS, B_LR, every=25),
            "b-grpo-kl": post_recipe("rl", MUL, w, B_STEPS, B_LR, every=25, rl={"kl_beta": KL_BETA, "kl_estimator": "k3",
                                                                  "kl_in": "loss", "reference": "copy"})}
    runs2 = run_arms(ARMS2, rec2, SEEDS_FORGET, dataset, code=True)
    save(info, runs1, runs2, {**warm, **warm_scores})
    write_outputs()


def save(info: dict, runs1: list, runs2: list, warm: dict | None) -> None:
    base, start, t2 = info["base"], info["start"], info["t2"]
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    header = {"experiment": EXP, "title": TITLE, "date": time.strftime("%Y-%m-%d"), "machine": c.machine(),
              "workers": c.WORKERS, "seeds": list(c.SEEDS), "seeds_forget": list(SEEDS_FORGET),
              "settings": {"rl_steps": RL_STEPS, "b_steps": B_STEPS, "lr": LR, "b_lr": B_LR, "warmup": WARMUP,
                           "eval_every": EVAL_EVERY, "eval_problems": EVAL_PROBLEMS, "warm_steps": WARM_STEPS,
                           "warm_lr": WARM_LR, "kl_beta": KL_BETA, "add": ADD, "mul": MUL,
                           "rollout": "16 prompts x 8 completions, temperature 1, 6 new tokens",
                           "sft_batch": "32 packed rows of 64 tokens", "base": "recipes/rl.yaml stages code + chat"},
              "base": {"wall_s": base["wall_s"], "cached": base["cached"], "sft_curve": base["curve"],
                       "add_em": start["scores"]["add"], "mul_em": start["scores"]["mul"],
                       "code_bpb": start["code"]["bpb"], "code_bpb_before_sft": info["code_model"]["code"]["bpb"]},
              "warm": None if warm is None else {
                  "wall_s": warm["wall_s"], "cached": warm["cached"], "curve": warm["curve"],
                  "add_em": warm["scores"]["add"], "mul_em": warm["scores"]["mul"], "code_bpb": warm["code"]["bpb"]},
              "wall_total_s": round(time.perf_counter() - info["t0"], 1), "wall_part1_s": round(t2 - info["t1"], 1),
              "wall_part2_s": round(time.perf_counter() - t2, 1) if warm else None,
              "cpu_total_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
              "load_average_1min": {"start": info["load0"], "end": round(os.getloadavg()[0], 2)}}
    lines = [header] + [line("rl_works", r, "rl" if r["name"] == "grpo" else "sft") for r in runs1] + \
        [line("forgetting", r, "rl" if "grpo" in r["name"] else "sft") for r in runs2]
    c.RESULTS.mkdir(parents=True, exist_ok=True)
    RECORD.write_text("".join(json.dumps(x, default=c._refuse) + "\n" for x in lines))


# ------------------------------------------------------------------ table and plot (from the record alone)

def load() -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in RECORD.read_text().splitlines() if x.strip()]
    return lines[0], lines[1:]


def _vals(runs, part, label, key, scale=100.0):
    return [scale * r["final"][key] for r in sorted(runs, key=lambda r: r["seed"])
            if r["part"] == part and r["label"] == label]


def _curve_at(runs, part, label, step):
    return [100 * v for r in sorted(runs, key=lambda r: r["seed"]) if r["part"] == part and r["label"] == label
            for s, v in r["curves"]["exact_match"] if s == step]


def table(header: dict, runs: list[dict]) -> str:
    s, b, w = header["settings"], header["base"], header["warm"]
    steps = sorted({st for r in runs if r["part"] == "rl_works" for st, _ in r["curves"]["exact_match"]})
    rows1 = [["0 (the SFT model)", f"{100 * b['add_em']:.1f}", f"{100 * b['add_em']:.1f}", "—"]]
    for st in steps:
        g, ctl = _curve_at(runs, "rl_works", "GRPO", st), _curve_at(runs, "rl_works", "SFT control", st)
        rows1.append([st, c.cell(g, 1), c.cell(ctl, 1), c.delta_cell(g, ctl, 1)])
    t1 = c.markdown_table(["step", "GRPO exact match %", "SFT control exact match %", "GRPO − control (points)"],
                          rows1)
    g, ctl = _vals(runs, "rl_works", "GRPO", "add_em"), _vals(runs, "rl_works", "SFT control", "add_em")
    startv = [100 * b["add_em"]] * len(g)
    fin = c.markdown_table(["final model (same 100 problems, greedy)", "exact match %", "Δ vs the SFT model",
                            "Δ vs control"],
                           [["GRPO", c.cell(g, 1), c.delta_cell(g, startv, 1), c.delta_cell(g, ctl, 1)],
                            ["SFT control", c.cell(ctl, 1), c.delta_cell(ctl, startv, 1), "—"]])
    part2 = "(stage B did not run)"
    if w is not None:
        ref_add, ref_warm = 100 * b["add_em"], 100 * w["add_em"]
        rows2 = [["A: addition model", "—", f"{ref_add:.1f}", f"{100 * b['mul_em']:.1f}", f"{b['code_bpb']:.4f}"],
                 [f"warm-start: {s['warm_steps']} SFT steps on mul", "—", f"{ref_add - ref_warm:+.1f}",
                  f"{100 * w['mul_em']:.1f}", f"{w['code_bpb']:.4f}"]]
        for lab, _ in ARMS2:
            add, mul = _vals(runs, "forgetting", lab, "add_em"), _vals(runs, "forgetting", lab, "mul_em")
            rows2.append([f"B: {lab}", c.cell([ref_warm - a for a in add], 1),
                          c.cell([ref_add - a for a in add], 1), c.cell(mul, 1),
                          c.cell(_vals(runs, "forgetting", lab, "code_bpb", 1), 4)])
        t2 = c.markdown_table(["model", "addition drop in B (points, from warm-start)",
                               "addition drop from A (points) [A row: exact match %]", "multiplication exact match %",
                               "code val bpb"], rows2)
        pairs = []
        for a, r in (("GRPO, no KL", "SFT"), ("GRPO, KL 0.05", "SFT"), ("GRPO, KL 0.05", "GRPO, no KL")):
            pairs.append([f"{a} − {r}", *(c.delta_cell(_vals(runs, "forgetting", a, k, sc),
                                                       _vals(runs, "forgetting", r, k, sc), d)
                                          for k, sc, d in (("add_em", 100, 1), ("mul_em", 100, 1),
                                                           ("code_bpb", 1, 4)))])
        t3 = c.markdown_table(["paired difference (same seed)", "addition exact match (points)",
                               "multiplication exact match (points)", "code val bpb"], pairs)
        part2 = f"{t2}\n\n{t3}"
    every = [[r["part"], r["label"], r["seed"], f"{100 * r['final']['add_em']:.0f}",
              f"{100 * r['final']['mul_em']:.0f}", "—" if r["final"]["code_bpb"] is None else f"{r['final']['code_bpb']:.4f}", f"{r['wall_s']:.0f}"]
             for r in runs]
    t4 = c.markdown_table(["part", "arm", "seed", "addition %", "multiplication %", "code val bpb", "wall s"], every)
    m, load = header["machine"], header["load_average_1min"]
    return (
        f"# {header['title']}\n\n## (1) GRPO vs more SFT at the same lr, from one SFT model\n\n"
        f"Exact match on {s['eval_problems']} held-out addition problems (the stages' own evaluation, greedy), "
        f"mean ± std over seeds {', '.join(map(str, header['seeds']))}:\n\n{t1}\n\n{fin}\n\n"
        f"## (2) Forgetting, first design (untestable; superseded by [rl_forgetting.md](rl_forgetting.md)): "
        f"addition (A), then multiplication (B) by SFT or GRPO\n\n"
        f"Seeds {', '.join(map(str, header['seeds_forget']))}; every arm starts from one shared warm-start "
        f"(the addition model answers {100 * b['mul_em']:.0f}% of multiplications: GRPO would get no reward "
        f"signal).\n\n{part2}\n\n## Every run\n\n{t4}\n\n"
        f"Settings: base = {s['base']} (code 120 steps, SFT 500 steps at 3e-3; {b['wall_s']:.0f} s, "
        f"{'cached' if b['cached'] else 'trained in this run'}); (1) {s['rl_steps']} steps per arm at lr "
        f"{s['lr']:g}, constant after {s['warmup']} warmup steps, evaluated every {s['eval_every']}; (2) warm-start {s['warm_steps']} SFT "
        f"steps at {s['warm_lr']:g} on multiplication ({s['mul']['min_digits']}..{s['mul']['max_digits']}-digit "
        f"operands, reversed), then {s['b_steps']} steps per arm at lr {s['b_lr']:g} (constant, same warmup); GRPO: {s['rollout']}, one optimizer step per "
        f"rollout; SFT: {s['sft_batch']}; KL arm: kl_beta {s['kl_beta']:g}, k3 in the loss, frozen fp32 copy. "
        f"Final exact match: this script, greedy, on the same {s['eval_problems']} validation problems "
        f"(generator seed 0) for every model. Code val bpb: `stagewise eval` on 32,768 tokens of the "
        f"pre-training validation split (the code model before SFT: {b['code_bpb_before_sft']:.4f}). "
        f"Δ and \"effect\": the noise rule (experiments/README.md): all seeds agree in sign and |mean| > 2× std. "
        f"Measured {header['date']} on {m['cpu']} ({m['cores']} cores, shared with another job), torch "
        f"{m['torch']}, {header['workers']} runs at a time, one thread each; whole experiment "
        f"{header['wall_total_s'] / 60:.1f} min wall ((1) {header['wall_part1_s'] / 60:.1f}, (2) "
        f"{(header['wall_part2_s'] or 0) / 60:.1f}), {header['cpu_total_s'] / 60:.1f} min CPU; 1-minute load "
        f"{load['start']:g} at the start, {load['end']:g} at the end. Raw numbers: [{EXP}.jsonl]({EXP}.jsonl).\n")


def plot(header: dict, runs: list[dict], path) -> None:
    fig, axes = c.figure(2 if header["warm"] else 1)
    rec1 = {"runs": [{**r, "curves": {"em": [[0, header["base"]["add_em"]]] + r["curves"]["exact_match"]}}
                     for r in runs if r["part"] == "rl_works"]}
    for i, (lab, _) in enumerate(ARMS1):
        c.band(axes[0], rec1, lab, "em", f"C{i}")
        axes[0].lines[-1].set_marker("o")
    axes[0].set(xlabel="post-training step", ylabel="addition exact match", title="(1) GRPO vs SFT control, lr 1e-4")
    axes[0].legend()
    if not header["warm"]:
        return c.save_figure(fig, path)
    labels = [lab for lab, _ in ARMS2]
    for k, (key, name) in enumerate((("add_em", "addition"), ("mul_em", "multiplication"))):
        vals = [c.mean_std(_vals(runs, "forgetting", lab, key)) for lab in labels]
        axes[1].bar([i + 0.4 * k for i in range(3)], [v[0] for v in vals], 0.4, yerr=[v[1] for v in vals],
                    label=f"{name} after B", color=f"C{k + 2}")
    axes[1].axhline(100 * header["base"]["add_em"], color="C2", linestyle=":", label="addition, model A")
    axes[1].axhline(100 * header["warm"]["add_em"], color="C2", linestyle="--", label="addition, warm-start")
    axes[1].set_xticks([i + 0.2 for i in range(3)], labels)
    axes[1].set(ylabel="exact match %", title="(2) after stage B (mean ± std over seeds)")
    axes[1].legend(fontsize=8)
    c.save_figure(fig, path)


def write_outputs() -> None:
    header, runs = load()
    md = c.RESULTS / f"{EXP}.md"
    md.write_text(table(header, runs))
    print(md.read_text())
    plot(header, runs, c.RESULTS / f"{EXP}.png")


if __name__ == "__main__":
    write_outputs() if "--tables" in sys.argv else main()
