"""Muon for the covered matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable") orthogonalises each 2-D weight's
momentum with five Newton-Schulz iterations; it is defined for hidden matrices only, so
embeddings, the output head, norms and biases take AdamW, as nanochat and modded-nanogpt do.
Both halves are torch's own (torch.optim.Muon, torch.optim.AdamW); this class only makes them one
optimizer: one list of param groups (the training step sets each group's lr) and one `state`
dict shared by both, so checkpoints (DCP) and zero_grad see a single optimizer. The default
lr adjustment, match_rms_adamw (Moonlight), scales Muon's step to AdamW's update RMS, so one
optim.lr serves both halves.
"""

from __future__ import annotations

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, lr: float, betas, eps: float,
                 weight_decay: float, momentum: float, nesterov: bool, ns_steps: int, adjust_lr_fn: str,
                 adamw_kwargs: dict):
        self._muon = torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        **adamw_kwargs)
        self._n_muon = len(self._muon.param_groups)
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {"lr": lr})
        self._link()

    def _link(self) -> None:
        # The halves read and write the same group dicts and the same state (their params are disjoint).
        self._muon.param_groups = self.param_groups[:self._n_muon]
        self._adamw.param_groups = self.param_groups[self._n_muon:]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._muon.step()
        self._adamw.step()
        return loss
