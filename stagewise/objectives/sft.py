"""Supervised fine-tuning: next-token loss on the trained tokens (assistant turns by default).

  ce    summed cross-entropy, the fused kernel of pre-training (model/loss.py).
  dft   Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement
        Learning Perspective with Reward Rectification"): each token's loss -log p is weighted
        by its own probability p, detached, i.e. loss = -sum sg(p) log p. The SFT gradient is a
        policy gradient with reward 1/p; the weight cancels that implicit, unbounded reward.
  asft  Anchored SFT (Zhu et al. 2025): dft plus kl_weight * KL(p_ref || p) summed over the
        vocabulary at every trained token, p_ref the frozen initial model, which keeps DFT from
        drifting away from it.

All three are normalised by the trained tokens. Validation always reports the plain
cross-entropy, so runs with different losses are compared on one number. Metrics (sums over
trained tokens, divided by their count by the step): sft/mean_p, the mean probability of the
target token (dft, asft); sft/kl, the mean KL to the initial model (asft).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.model.loss import chunk_rows
from stagewise.objectives.base import ObjectiveOutput, num_targets, packing_kwargs, token_model
from stagewise.objectives.causal_lm import causal_lm_loss


class SFT:
    name = "sft"

    def __init__(self, loss: str = "ce", kl_weight: float = 0.1, reference: torch.nn.Module | None = None):
        assert loss in ("ce", "dft", "asft"), loss
        assert loss != "asft" or reference is not None, "asft needs the initial model as its reference"
        self.loss, self.kl_weight, self.reference = loss, kl_weight, reference

    def count(self, batch: Batch) -> int:
        return num_targets(batch)

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        return causal_lm_loss(model, batch)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        if self.loss == "ce":
            return causal_lm_loss(model, batch)
        net = token_model(model)
        assert net is not None, "dft and asft need stagewise's Transformer (per-token log-probs)"
        valid = batch.targets != IGNORE_INDEX
        n = valid.sum()
        if self.loss == "dft":
            lp = model.token_logprobs(batch.inputs, batch.targets, **packing_kwargs(batch))
            p = lp.detach().exp() * valid
            return ObjectiveOutput(-(p * lp).sum(), n, {"sft/mean_p": p.sum()})
        return self._asft(model, net, batch, valid, n)

    def _asft(self, model, net, batch: Batch, valid, n) -> ObjectiveOutput:
        kwargs = packing_kwargs(batch)
        h = net.hidden_states(batch.inputs, **kwargs)[valid]          # [N, d], trained rows only
        with torch.no_grad():
            ref = token_model(self.reference)
            h_ref = ref.hidden_states(batch.inputs, **kwargs)[valid]
        targets = batch.targets[valid]
        # Row chunks, each recomputed in the backward: the fp32 [N, V] logits never exist at once.
        rows = chunk_rows(net.cfg.vocab_size, net.cfg.d_model)
        dft, kl, mean_p = h.new_zeros((), dtype=torch.float32), 0.0, 0.0
        for s in range(0, h.shape[0], rows):
            d, k, p = checkpoint(_asft_chunk, h[s:s + rows], net.output.weight, h_ref[s:s + rows],
                                 ref.output.weight, targets[s:s + rows], use_reentrant=False)
            dft, kl, mean_p = dft + d, kl + k, mean_p + p
        loss = dft + self.kl_weight * kl
        return ObjectiveOutput(loss, n, {"sft/mean_p": mean_p, "sft/kl": kl.detach()})


def _asft_chunk(h, weight, h_ref, weight_ref, targets):
    """(DFT loss sum, KL(p_ref || p) sum, sum of p(target)) of a chunk of rows."""
    logp = F.log_softmax((h @ weight.t().to(h.dtype)).float(), dim=-1)
    logp_ref = F.log_softmax((h_ref @ weight_ref.t().to(h_ref.dtype)).float(), dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    p = lp.detach().exp()
    kl = (logp_ref.exp() * (logp_ref - logp)).sum()
    return -(p * lp).sum(), kl, p.sum()


def build_sft_objective(sft_cfg, context: dict | None = None) -> SFT:
    """context: {"reference": the frozen initial model} for asft."""
    context = context or {}
    return SFT(sft_cfg.loss, sft_cfg.asft_kl_weight, context.get("reference"))
