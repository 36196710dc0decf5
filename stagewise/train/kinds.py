"""Stage kinds: each assembles a `Stage` (source, objective, evaluation, schedule) from the recipe.

  lm    next-token prediction on token windows: a plain recipe's one dataset, or a staged
        recipe's domain mixture with replay (docs/continual.md)
  sft   supervised fine-tuning on chat conversations (train/sft_kind.py, docs/sft.md)
  dpo   preference optimisation on pairs, with its reference (train/dpo_kind.py, docs/dpo.md)
  rl    RL with verifiable rewards: rollouts, rewards, the policy-gradient estimator (train/rl_kind.py,
        docs/rl.md)

`RunData` is what the runner has prepared before any stage is built: the run's tokenizer and
the data every stage kind needs (token datasets per domain; encoded conversations for SFT).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.config.schema import RunConfig
from stagewise.data import SequenceSampler, Tokenizer, eval_batches
from stagewise.data.batch import Batch
from stagewise.data.mixture import MixtureSampler
from stagewise.eval import evaluate
from stagewise.objectives import build_objective
from stagewise.train import stages as plan
from stagewise.train.stage import Stage


@dataclass
class RunData:
    cfg: RunConfig
    tokenizer: Tokenizer
    run_dir: Path
    datasets: dict = field(default_factory=dict)   # domain name -> TokenDataset ("" for a plain recipe)
    chat: dict = field(default_factory=dict)       # stage name -> encoded SFT data; "dpo:<name>" -> preferences
    staged: bool = False

    def domain_evaluator(self, names, trained, objective, cfg: RunConfig):
        """val_loss/<domain> and val_bpb/<domain> for every name, and their means over `trained`;
        a plain recipe (its one unnamed domain) reports just val_loss and val_bpb."""
        T, B = cfg.data.seq_len, cfg.train.batch_size
        val = {n: [Batch(x, y) for x, y in eval_batches(self.datasets[n].val, T, B, cfg.eval.batches)] for n in names}
        token_bytes = self.tokenizer.token_bytes

        def run(model, precision) -> dict:
            out = {}
            for n, batches in val.items():
                res = evaluate(model, batches, precision, token_bytes=token_bytes, objective=objective)
                out[f"val_loss/{n}"], out[f"val_bpb/{n}"] = res["loss"], res["bits_per_byte"]
            for key in ("val_loss", "val_bpb") if trained else ():  # the mean over the domains trained on
                out[key] = sum(out[f"{key}/{n}"] for n in trained) / len(trained)
            return out if self.staged else {k: out[k] for k in ("val_loss", "val_bpb")}
        return run


def lm_stage(run: RunData, index: int, start: int) -> Stage:
    cfg = plan.stage_config(run.cfg, index)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    objective = build_objective("lm")
    if not run.staged:
        source = SequenceSampler(run.datasets[""].train, T, B, cfg.seed)
        probs, trained, seen = {"": 1.0}, [""], [""]
    else:
        st = run.cfg.stages[index]
        probs = plan.mixture_probs(run.cfg, index)
        trained = [d.name for d in st.mixture if d.weight > 0]
        samplers = {n: SequenceSampler(run.datasets[n].train, T, 1, _domain_seed(cfg.seed, n)) for n in probs}
        source = MixtureSampler(samplers, probs, B, stage=index, replayed=tuple(n for n in probs if n not in trained))
        seen = plan.seen_domains(run.cfg, index)
    evaluate = run.domain_evaluator(seen, trained, objective, cfg)
    from stagewise.train.carried import earlier_evaluator

    if (earlier := earlier_evaluator(run, index, cfg, domains=False)) is not None:  # an lm stage after post-training
        own = evaluate

        def evaluate(model, precision) -> dict:
            return {**own(model, precision), **earlier(model, precision)}
    return Stage(**plan.common_fields(run.cfg, index, start, run.run_dir), kind="lm", cfg=cfg, source=source,
                 objective=objective, evaluate=evaluate, run_dir=run.run_dir, flops_seq_len=T)


def _domain_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")) % 2**63


def _sft_stage(run: RunData, index: int, start: int) -> Stage:
    from stagewise.train.sft_kind import sft_stage

    return sft_stage(run, index, start)


def _dpo_stage(run: RunData, index: int, start: int) -> Stage:
    from stagewise.train.dpo_kind import dpo_stage

    return dpo_stage(run, index, start)


def _rl_stage(run: RunData, index: int, start: int) -> Stage:
    from stagewise.train.rl_kind import rl_stage

    return rl_stage(run, index, start)


STAGE_KINDS = {"lm": lm_stage, "sft": _sft_stage, "dpo": _dpo_stage, "rl": _rl_stage}


def build_stage(run: RunData, index: int, start: int) -> Stage:
    return STAGE_KINDS[plan.stage_kind(run.cfg, index)](run, index, start)
