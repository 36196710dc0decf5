"""The `rl` stage kind: RL with verifiable rewards (GRPO and its relatives; docs/rl.md).

Its batch source (rl/rollouts.py) samples completions of the task's prompts with the current
policy, scores them with the task's verifier (rl/tasks.py) and turns the rewards into
advantages; its objective (rl/objective.py) is the unified policy-gradient estimator. The
reference policy of the KL term (rl.kl_beta > 0; none is loaded at 0) is the stage's start:
a frozen copy (rl.reference copy, stored in reference_dtype) or, for an adapter stage, the policy
with its adapters switched off.

Evaluation (every eval step): exact_match (share of rl.eval_problems validation prompts whose
greedy completion the verifier accepts) and val_reward (their mean reward), plus the validation
losses of every pre-training domain and earlier sft stage, as the sft and dpo kinds report them.
"""

from __future__ import annotations

import torch

from stagewise.data.chat import require_template
from stagewise.generate.engine import generate_batch
from stagewise.objectives.base import token_model
from stagewise.rl.objective import PolicyGradient
from stagewise.rl.rollouts import RolloutSource
from stagewise.train import stages as plan
from stagewise.train.stage import Stage


def rl_config(cfg, index: int):
    return cfg.stages[index].rl if cfg.stages else cfg.rl


def reference_mode(rl, adapter_kind: str) -> str:
    """none (kl_beta 0: nothing loaded), copy or adapters-off."""
    if rl.kl_beta == 0:
        return "none"
    if rl.reference != "auto":
        return rl.reference
    return "adapters-off" if adapter_kind != "none" else "copy"


def task_options(rl) -> dict | None:
    if rl.task == "arithmetic":
        a = rl.arithmetic
        return {"ops": list(a.ops), "min_digits": a.min_digits, "max_digits": a.max_digits, "format": a.format,
                "format_reward": rl.format_reward}
    if rl.task == "countdown":
        c = rl.countdown
        return {"numbers": c.numbers, "max_number": c.max_number, "use_all": c.use_all,
                "format_reward": rl.format_reward}
    return None


def build_objective(rl) -> PolicyGradient:
    return PolicyGradient(mask=rl.mask, denominator=rl.denominator, clip_eps=rl.clip_eps,
                          clip_eps_high=rl.clip_eps_high, importance=rl.importance, aggregation=rl.loss_agg,
                          kl_beta=rl.kl_beta, kl_estimator=rl.kl_estimator, kl_in_loss=rl.kl_in == "loss",
                          max_new_tokens=rl.max_new_tokens)


class _Reference:
    """Per-token log-probs of the KL's reference policy for a rollout batch."""

    def __init__(self, mode: str):
        self.mode, self.model = mode, None

    @torch.no_grad()
    def __call__(self, policy, batch) -> torch.Tensor:
        if self.mode == "copy":
            return self.model.token_logprobs(batch.inputs, batch.targets, rows=batch.target_rows)[0]
        from stagewise.adapters.apply import adapters_disabled

        with adapters_disabled(token_model(policy)):
            return policy.token_logprobs(batch.inputs, batch.targets, rows=batch.target_rows)[0]


@torch.no_grad()
def task_scores(model, precision, tokenizer, template, task, problems: list, max_new_tokens: int,
                batch_size: int = 64) -> dict:
    """exact_match and val_reward of greedy completions of `problems`."""
    was = model.training
    model.eval()
    stop = template.stop_ids(tokenizer)
    right, reward = 0, 0.0
    with precision.inference():
        for s in range(0, len(problems), batch_size):
            part = problems[s:s + batch_size]
            prompts = [template.prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in part]
            outs = generate_batch(model, prompts, max_new_tokens, stop_ids=stop).tokens
            for p, ids in zip(part, outs):
                text = tokenizer.decode(ids)
                right += bool(task.correct(p, text))
                reward += float(task.reward(p, text))
    model.train(was)
    return {"exact_match": right / len(problems), "val_reward": reward / len(problems)}


def rl_stage(run, index: int, start: int) -> Stage:
    from stagewise.train.carried import earlier_evaluator, own_scores, rl_problems, task_scorer
    from stagewise.train.dpo_kind import load_reference, reference_dtype

    cfg = plan.stage_config(run.cfg, index)
    rl = rl_config(run.cfg, index)
    where = f"stages[{index}].rl" if run.cfg.stages else "rl"
    template = require_template(run.tokenizer, f"{where}: the tokenizer")
    task, train, _ = rl_problems(run, index)
    mode = reference_mode(rl, cfg.adapter.kind)
    dtype = reference_dtype(rl, cfg.precision.mode, where)
    reference = _Reference(mode) if mode != "none" else None
    objective = build_objective(rl)
    source = RolloutSource(task, train, run.tokenizer, template, rl, cfg.seed, cfg.train.grad_accum, objective,
                           stage=index, reference=reference)
    base = plan.base_source(run.cfg, run.run_dir, index)

    def prepare(device, precision, log) -> None:
        if mode == "copy":
            reference.model = load_reference(base, dtype, device)[0]

    earlier = earlier_evaluator(run, index, cfg)
    score = task_scorer(run, index, cfg.data.seq_len)
    name = plan.stage_name(run.cfg, index)

    def evaluate_stage(model, precision) -> dict:
        out = own_scores(score(model, precision), name, run.staged) if score is not None else {}
        if earlier is not None:
            out.update(earlier(model, precision))
        return out

    return Stage(**plan.common_fields(run.cfg, index, start, run.run_dir), kind="rl", cfg=cfg, source=source,
                 objective=objective, evaluate=evaluate_stage, run_dir=run.run_dir,
                 flops_seq_len=rl.max_new_tokens, prepare=prepare, bind=source.bind,
                 reference_forward=mode != "none")
