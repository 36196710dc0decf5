"""Learning-rate schedules as pure functions of the step.

A schedule has no state beyond the step number, so resuming restores it exactly by
restoring the step. `lr_at(step)` is the LR used for optimizer step `step` (0-based).

- warmup: linear from lr/warmup_steps at step 0 to the peak at step warmup_steps-1
  (never exactly 0, so the first step is not wasted).
- cosine: peak -> min_lr_ratio*peak following half a cosine over the remaining steps.
- linear: peak -> min_lr_ratio*peak linearly.
- wsd (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): hold the peak, then decay linearly
  to min_lr_ratio*peak over the last decay_fraction of all steps.
- constant: the peak after warmup.
- infinite ("Simple and Scalable Strategies to Continually Pre-train LLMs", Ibrahim et al. 2024;
  also Hägele et al. 2024): the peak after warmup, not tied to total_steps; once a cooldown
  starts (after `cooldown_start` completed steps: schedule.cooldown_at_step, or the step at
  which a staged run saw RUN_DIR/COOLDOWN) it decays linearly to min_lr_ratio*peak over
  cooldown_steps and stays there.
The last step (total_steps-1) reaches exactly min_lr_ratio*peak for the decaying schedules.
"""

from __future__ import annotations

import math

from stagewise.config.schema import ScheduleConfig


def lr_at(step: int, peak_lr: float, total_steps: int, cfg: ScheduleConfig,
          cooldown_start: int | None = None) -> float:
    warmup = cfg.warmup_steps
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.name == "constant":
        return peak_lr
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.name == "infinite":
        start = cooldown_start if cooldown_start is not None else cfg.cooldown_at_step
        if start is None or step < start:
            return peak_lr
        # step start is the first cooled step; start + cooldown_steps - 1 reaches the floor.
        progress = min(1.0, (step - start + 1) / cfg.cooldown_steps)
        return peak_lr + (floor - peak_lr) * progress
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        span = total_steps - 1 - decay_start
        progress = 1.0 if span <= 0 else (step - decay_start) / span
        return peak_lr + (floor - peak_lr) * progress
    span = total_steps - 1 - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if cfg.name == "linear":
        return peak_lr + (floor - peak_lr) * progress
    if cfg.name == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise AssertionError(f"unknown schedule {cfg.name}")
