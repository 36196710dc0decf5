"""Training objectives. A stage kind builds its objective with `build_objective`; the step and
the evaluation call it without knowing which one it is (objectives/base.py)."""

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.objectives.base import Objective, ObjectiveOutput, num_targets
from stagewise.objectives.causal_lm import CausalLM, causal_lm_loss

OBJECTIVES = {"causal-lm": CausalLM()}


def build_objective(kind: str, stage_cfg=None, context=None) -> Objective:
    """The objective of a stage of `kind`, given the stage's config and what it may need (tokenizer,
    a reference model); only kinds that need them read stage_cfg and context."""
    if kind == "lm":
        return CausalLM()
    if kind == "sft":
        from stagewise.objectives.sft import build_sft_objective

        return build_sft_objective(stage_cfg, context)
    raise AssertionError(f"unknown stage kind {kind!r}")


__all__ = ["IGNORE_INDEX", "OBJECTIVES", "Batch", "CausalLM", "Objective", "ObjectiveOutput", "build_objective",
           "causal_lm_loss", "num_targets"]
