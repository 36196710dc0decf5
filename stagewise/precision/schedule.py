"""Precision schedules: change the mode at a step (e.g. bf16-mixed pre-training, then
quantisation-aware continued pre-training, "Continual Quantization-Aware Pre-Training").

`precision.schedule: [{at_step: N, mode: M, optimizer_state: keep|reset}]`: after N optimizer
steps have completed, the run continues in mode M. The switch tears the old mode down (linears
unswapped, parameters back to fp32 — a Kahan compensation folded into the weights), sets the
new one up, and builds the optimizer again over the same Parameters; with `keep`, AdamW's
moments and step counts move across (cast to the new parameter dtype), with `reset` they start
from zero. Counters (steps, skipped) carry over; mode-specific state (loss scale, fp8 amax
histories) starts fresh.

Exact resume: a checkpoint saved at step s belongs to the mode active *during* step s, i.e.
the last stage with at_step < s (`mode_at`). A run resumed from the checkpoint at the switch
step loads it in the old mode and switches right away, as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from stagewise.config.schema import PrecisionConfig
from stagewise.precision.base import Precision


def mode_at(cfg: PrecisionConfig, completed_steps: int) -> str:
    """The mode the step after `completed_steps` is taken in, before a switch due at that point."""
    mode = cfg.mode
    for stage in cfg.schedule:
        if stage.at_step < completed_steps:
            mode = stage.mode
    return mode


def stage_due(cfg: PrecisionConfig, completed_steps: int):
    """The schedule entry whose switch happens before the next step, or None."""
    return next((s for s in cfg.schedule if s.at_step == completed_steps), None)


def switch_precision(cfg: PrecisionConfig, stage, model: torch.nn.Module, old: Precision,
                     optimizer: torch.optim.Optimizer,
                     build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], device: torch.device):
    """Returns (model, new precision, new optimizer); the Parameters themselves are kept."""
    from stagewise.precision import build_precision

    comp = {p: optimizer.state[p].get("compensation") for p in _params(optimizer)} if optimizer.state else {}
    old_state = {p: dict(optimizer.state[p]) for p in _params(optimizer) if optimizer.state.get(p)}
    model = old.teardown(model)
    with torch.no_grad():
        for p, c in comp.items():
            if c is not None:  # the Kahan buffer holds update not yet in the weight: give it back
                p.add_(c.to(p.dtype))
    new = build_precision(dataclasses.replace(cfg, mode=stage.mode), device)
    new.steps, new.skipped = old.steps, old.skipped
    model = new.setup(model, old.keep)
    fresh = new.setup_optimizer(build_optimizer(model))
    if stage.optimizer_state == "keep":
        for p in _params(fresh):
            st = old_state.get(p)
            if st:
                fresh.state[p] = {k: (v.to(p.dtype) if k in ("exp_avg", "exp_avg_sq") else v.clone())
                                  for k, v in st.items() if k != "compensation"}
    return model, new, fresh


def _params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]
