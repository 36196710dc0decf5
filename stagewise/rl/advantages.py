"""Rewards -> advantages, per group of G completions of one prompt (rows g*G .. g*G + G - 1).

  grpo       r - mean(group), divided by std + 1e-4 per scale_rewards: group (the group's std,
             DeepSeekMath's GRPO), batch (the std over the whole rollout), none (Dr. GRPO, Liu et al.
             2025: no division, which biases towards neither easy nor hard prompts). std is the
             unbiased sample std, as TRL's GRPOTrainer.
  rloo       r - mean of the group's other G - 1 rewards (leave-one-out baseline, Ahmadian et al. 2024)
  remax      r - the reward of the prompt's greedy completion (ReMax, Li et al. 2024)
  reinforce  r - mean over the whole rollout (REINFORCE with a mean baseline)

A group whose rewards all agree gets advantage 0 under grpo, rloo and reinforce-within-group:
no gradient, which is what dynamic sampling (rl.dynamic_sampling) removes or replaces.
"""

from __future__ import annotations

import torch

ALGORITHMS = ("grpo", "rloo", "remax", "reinforce")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4


def advantages(rewards: torch.Tensor, group_size: int, algorithm: str = "grpo", scale_rewards: str = "group",
               baseline: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [P * G] (fp32) -> advantages [P * G]; baseline [P]: remax's greedy rewards."""
    G = group_size
    grouped = rewards.view(-1, G)
    if algorithm == "grpo":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        if scale_rewards == "group":
            std = grouped.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(grouped[:, :1])
            centred = centred / (std + STD_EPS)
        elif scale_rewards == "batch":
            std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
            centred = centred / (std + STD_EPS)
        return centred.reshape(-1)
    if algorithm == "rloo":
        if G < 2:
            raise ValueError("rloo needs at least 2 completions per prompt")
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (G - 1)
        return (grouped - others).reshape(-1)
    if algorithm == "remax":
        assert baseline is not None and baseline.numel() == grouped.shape[0], "remax needs one greedy reward per prompt"
        return (grouped - baseline.view(-1, 1).to(grouped.dtype)).reshape(-1)
    if algorithm == "reinforce":
        return rewards - rewards.mean()
    raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: groups whose rewards all agree (no learning signal under a group baseline)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)
