"""The policy-gradient objective, written as the unified estimator of post-training.

"Towards a Unified View of Large Language Model Post-Training" (Lv et al. 2025, HPT) writes SFT,
DFT, PPO, GRPO and their relatives as one gradient with four interchangeable parts:

    grad = E_t[ stabilization mask  x  1 / pi_ref(y_t)  x  advantage  x  grad pi_theta(y_t) ]

`PolicyGradient` takes those four parts by name:

  mask         none: every token; clip: PPO's trust region (Schulman et al. 2017) — a token whose
               ratio r = pi_theta / pi_ref has left [1 - clip_eps, 1 + clip_eps_high] in the direction
               its advantage pushes gets no gradient (clip_eps_high > clip_eps: DAPO's clip-higher)
  denominator  the reference-policy denominator pi_ref: current (pi_theta itself, detached:
               grad pi / pi = grad log pi, SFT and REINFORCE), old (the policy that sampled the
               rollout: PPO / GRPO's importance ratio), one (no denominator: grad pi, DFT)
  advantage    per sequence, from the batch: rewards turned into advantages by the rollout source
               (rl/advantages.py: grpo, rloo, remax, reinforce), or 1 for demonstrations (SFT)
  likelihood   the per-token log-probs of the trained tokens (Transformer.token_logprobs)

The loss whose gradient is that estimator: per token, -r * A with r = exp(log pi - log pi_ref)
(value and gradient through exp; with mask clip, -min(r A, clip(r) A), PPO's form, which has
the same gradient as the masked -r A and the value TRL reports). importance: sequence replaces
each token's ratio by its sequence's exp(mean log-ratio) (GSPO, Zheng et al. 2025);
sequence-sum by exp(summed log-ratio) (TRL's RLOO trainer). Plus, with kl_beta > 0 and kl_in:
loss, beta * k per token, k the k1 (log pi - log pi_ref_model) or k3 (exp(d) - d - 1,
d = log pi_ref_model - log pi; Schulman 2020) estimator of KL(pi || pi_ref_model).

Aggregation (what the step's loss is divided by; objectives return sums, the step divides):
  token-mean               every trained token of the step weighs the same (DAPO; TRL's "dapo")
  seq-mean-token-mean      each sequence's token mean, averaged over sequences (GRPO's paper; TRL "grpo")
  seq-mean-token-sum-norm  each sequence's token sum / max_new_tokens, averaged (Dr. GRPO; TRL "dr_grpo")

Hybrid post-training (HPT): rows flagged `demo` in the batch are demonstrations, trained with the
SFT configuration of the same estimator (mask none, denominator current, advantage 1) in the same
aggregation, while the others take the configured RL parts.

Metrics (means over the step's trained tokens): rl/clip_frac (share of tokens whose gradient the
mask removed), rl/kl (the configured estimator, when a reference is used), rl/ratio (mean r).
"""

from __future__ import annotations

import torch

from stagewise.data.batch import Batch
from stagewise.objectives.base import ObjectiveOutput

MASKS = ("none", "clip")
DENOMINATORS = ("current", "old", "one")
IMPORTANCE = ("token", "sequence", "sequence-sum")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    if estimator == "k1":
        return logp - ref_logp
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


class PolicyGradient:
    name = "rl"

    def __init__(self, mask: str = "clip", denominator: str = "old", clip_eps: float = 0.2,
                 clip_eps_high: float | None = None, importance: str = "token", aggregation: str = "token-mean",
                 kl_beta: float = 0.0, kl_estimator: str = "k3", kl_in_loss: bool = True, max_new_tokens: int = 1):
        assert mask in MASKS and denominator in DENOMINATORS and importance in IMPORTANCE, (mask, denominator)
        assert aggregation in AGGREGATIONS and kl_estimator in KL_ESTIMATORS, (aggregation, kl_estimator)
        assert importance == "token" or denominator == "old", "sequence-level ratios are against the old policy"
        self.mask, self.denominator, self.importance, self.aggregation = mask, denominator, importance, aggregation
        self.clip_low = clip_eps
        self.clip_high = clip_eps if clip_eps_high is None else clip_eps_high
        self.kl_beta, self.kl_estimator, self.kl_in_loss = kl_beta, kl_estimator, kl_in_loss
        self.max_new_tokens = max_new_tokens

    def count(self, batch: Batch) -> int:
        """token-mean: the trained tokens; the sequence aggregations: the sequences."""
        return int(batch.target_rows.numel()) if self.aggregation == "token-mean" else int(batch.advantages.numel())

    def evaluate(self, model, batch: Batch) -> ObjectiveOutput:
        return self(model, batch)

    def __call__(self, model, batch: Batch) -> ObjectiveOutput:
        T = batch.inputs.shape[1]
        rows = batch.target_rows
        seq = rows // T                                                     # [N] sequence of each token
        logp = model.token_logprobs(batch.inputs, batch.targets, rows=rows)[0]
        return self.loss_from_logps(logp, seq, batch)

    def loss_from_logps(self, logp: torch.Tensor, seq: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        """The loss of per-token log-probs logp [N] (differentiable) of sequences seq [N]."""
        B = batch.advantages.numel()
        adv = batch.advantages.to(logp.dtype)[seq]
        old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
        lengths = torch.zeros(B, dtype=logp.dtype, device=logp.device).index_add_(0, seq, torch.ones_like(logp))
        log_den = {"current": logp.detach(), "old": old, "one": torch.zeros_like(logp)}[self.denominator]
        log_ratio = logp - log_den
        if self.importance != "token":  # one ratio per sequence, broadcast to its tokens
            per_seq = torch.zeros(B, dtype=logp.dtype, device=logp.device).index_add(0, seq, log_ratio)
            if self.importance == "sequence":
                per_seq = per_seq / lengths.clamp(min=1)
            log_ratio = per_seq[seq]
        ratio = torch.exp(log_ratio)
        if self.mask == "clip":
            clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high)
            per_token = -torch.min(ratio * adv, clipped * adv)
            removed = ((ratio < 1 - self.clip_low) & (adv < 0)) | ((ratio > 1 + self.clip_high) & (adv > 0))
        else:
            per_token = -ratio * adv
            removed = torch.zeros_like(logp, dtype=torch.bool)
        if batch.demo is not None:  # HPT: demonstrations take the SFT parts of the estimator
            demo = batch.demo[seq]
            per_token = torch.where(demo, -torch.exp(logp - logp.detach()), per_token)
            removed = removed & ~demo
        metrics = {"rl/clip_frac": removed.float().sum(), "rl/ratio": ratio.detach().float().sum()}
        if self.kl_beta > 0:
            kl = kl_estimate(logp, batch.ref_logprobs, self.kl_estimator)
            if self.kl_in_loss:
                per_token = per_token + self.kl_beta * kl
            metrics["rl/kl"] = kl.detach().float().sum()
        n = torch.tensor(float(logp.numel()), device=logp.device)
        counts = {k: n for k in metrics}
        if self.aggregation == "token-mean":
            loss = per_token.sum()
        else:
            norm = lengths.clamp(min=1) if self.aggregation == "seq-mean-token-mean" else \
                torch.full_like(lengths, float(self.max_new_tokens))
            loss = (per_token / norm[seq]).sum()
        normaliser = torch.tensor(logp.numel() if self.aggregation == "token-mean" else B, device=logp.device)
        return ObjectiveOutput(loss, normaliser, metrics, counts)  # fp32 in training (log-probs are fp32)
