"""What a stage measures of the stages before it: the columns of the forgetting matrix.

Every stage of a staged recipe evaluates, at each of its evaluations, every domain and task that a
stage up to and including it introduced (train/stages.py: forgetting_columns):

  val_loss/<d>, val_bpb/<d>     each pre-training domain seen so far (its validation windows)
  val_loss/<s>, val_bpb/<s>     each earlier sft stage s (its validation conversations' assistant tokens)
  exact_match/<s>               each verifiable stage s so far: an sft or dpo stage on built-in arithmetic,
                                or an rl stage (greedy completions of its validation problems, checked by
                                the task's verifier); an rl stage also gives val_reward/<s>

The stage's own task is scored by the same function (`task_scorer`), so `exact_match/<s>` inside
stage s and after it are one measurement on the same problems.
"""

from __future__ import annotations

from stagewise.data.arithmetic import Problem
from stagewise.data.packing import eval_rows
from stagewise.eval import evaluate
from stagewise.objectives.causal_lm import CausalLM
from stagewise.train import stages as plan


def sft_data(run, j: int, seq_len: int):
    """Stage j's encoded sft data, loaded once per run."""
    from stagewise.data.sft_data import load_sft_data

    st = run.cfg.stages[j] if run.cfg.stages else None
    name = plan.stage_name(run.cfg, j)
    if name not in run.chat:
        where = f"stages[{j}].sft" if st else "sft"
        run.chat[name] = load_sft_data(st.sft if st else run.cfg.sft, run.tokenizer, seq_len, where, log=_quiet)
    return run.chat[name]


def preference_data(run, j: int, seq_len: int):
    """Stage j's encoded preference data, loaded once per run."""
    from stagewise.data.preference import load_preference_data

    st = run.cfg.stages[j] if run.cfg.stages else None
    key = f"dpo:{plan.stage_name(run.cfg, j)}"
    if key not in run.chat:
        where = f"stages[{j}].dpo" if st else "dpo"
        run.chat[key] = load_preference_data(st.dpo if st else run.cfg.dpo, run.tokenizer, seq_len, where, log=_quiet)
    return run.chat[key]


def rl_problems(run, j: int):
    """(task, train problems, validation problems) of rl stage j, drawn once per run."""
    from stagewise.rl.tasks import build_task
    from stagewise.train.rl_kind import rl_config, task_options

    rl = rl_config(run.cfg, j)
    task = build_task(rl.task, task_options(rl))
    seed = rl.arithmetic.seed if rl.task == "arithmetic" else plan.stage_config(run.cfg, j).seed
    key = f"rl:{plan.stage_name(run.cfg, j)}"
    if key not in run.chat:
        run.chat[key] = (task.problems("train", rl.train_problems, seed),
                         task.problems("val", rl.eval_problems, seed) if rl.eval_problems else [])
    return (task, *run.chat[key])


def task_scorer(run, j: int, seq_len: int):
    """(model, precision) -> {"exact_match": ..} (rl: and "val_reward") on stage j's verifiable validation
    problems; None when stage j has none (an lm stage, an sft/dpo stage without built-in arithmetic)."""
    from stagewise.data.chat import require_template
    from stagewise.train.rl_kind import rl_config, task_scores
    from stagewise.train.sft_kind import exact_match

    kind = plan.stage_kind(run.cfg, j)
    if kind == "sft":
        sft = plan.stage_section(run.cfg, j, "sft")
        data = sft_data(run, j, seq_len)
        problems = [Problem.from_conversation(c.extra | {"messages": c.messages}) for c in data.val_conversations
                    if "problem" in c.extra][:sft.eval_generate]
        template, new_tokens = data.template, sft.eval_max_new_tokens
    elif kind == "dpo":
        dpo = plan.stage_section(run.cfg, j, "dpo")
        data = preference_data(run, j, seq_len)
        problems = [Problem(**u.extra["problem"]) for u in data.val if "problem" in u.extra][:dpo.eval_generate]
        template, new_tokens = data.template, dpo.eval_max_new_tokens
    elif kind == "rl":
        rl = rl_config(run.cfg, j)
        task, _, problems = rl_problems(run, j)
        template = require_template(run.tokenizer, f"stages[{j}].rl: the tokenizer")
        if not problems:
            return None
        return lambda model, precision: task_scores(model, precision, run.tokenizer, template, task, problems,
                                                    rl.max_new_tokens)
    else:
        return None
    if not problems:
        return None
    return lambda model, precision: {"exact_match": exact_match(model, precision, run.tokenizer, template, problems,
                                                                new_tokens)}


def earlier_evaluator(run, index: int, cfg, domains: bool = True):
    """(model, precision) -> the keys above for everything stages 0..index-1 introduced, plus the
    pre-training domains of stage index itself (domains=False: leave those to the caller, the lm kind);
    None for an unstaged recipe or when there is nothing to measure."""
    if not run.staged:
        return None
    T, B = cfg.data.seq_len, cfg.train.batch_size
    parts = []
    seen = plan.seen_domains(run.cfg, index)
    if domains and seen:
        lm = run.domain_evaluator(seen, [], CausalLM(), cfg)
        parts.append(lambda m, p: {k: v for k, v in lm(m, p).items() if "/" in k})
    for j, st in enumerate(run.cfg.stages[:index]):
        if st.kind == "sft":
            rows = eval_rows(sft_data(run, j, T).val, T, B, cfg.eval.batches, run.tokenizer.eos_id)
            parts.append(_sft_loss(st.name, rows, run.tokenizer.token_bytes))
        if (score := task_scorer(run, j, T)) is not None:
            parts.append(_suffixed(score, st.name))
    if not parts:
        return None

    def run_all(model, precision) -> dict:
        out = {}
        for part in parts:
            out.update(part(model, precision))
        return out
    return run_all


def _sft_loss(name: str, rows, token_bytes):
    def run(model, precision) -> dict:
        res = evaluate(model, rows, precision, token_bytes=token_bytes)
        return {f"val_loss/{name}": res["loss"], f"val_bpb/{name}": res["bits_per_byte"]}
    return run


def _suffixed(score, name: str):
    return lambda model, precision: {f"{k}/{name}": v for k, v in score(model, precision).items()}


def _quiet(msg: str) -> None:
    pass


def own_scores(scores: dict, name: str, staged: bool) -> dict:
    """A stage's own task scores: unprefixed (exact_match, val_reward), and in a staged recipe also as
    the forgetting matrix's <key>/<stage name>."""
    return {**scores, **({f"{k}/{name}": v for k, v in scores.items()} if staged else {})}
