"""Preference optimisation: DPO and its family on sequence log-probs of (chosen, rejected) pairs.

With pi_c, pi_r the policy's summed log-probs of the chosen / rejected response tokens, ref_c,
ref_r the reference's, |c|, |r| the response lengths in tokens, rho_c = pi_c - ref_c,
rho_r = pi_r - ref_r and d = rho_c - rho_r, the per-pair losses are (docs/dpo.md):

  sigmoid  -log sigmoid(beta d)                                   DPO (Rafailov et al. 2023)
  ipo      (rho_c/|c| - rho_r/|r| - 1/(2 beta))^2                 IPO (Azar et al. 2023), per-token
                                                                  log-ratios as TRL computes them
  hinge    max(0, 1 - beta d)                                     SLiC-HF (Zhao et al. 2023)
  robust   (-(1-e) log sigmoid(beta d) + e log sigmoid(-beta d)) / (1 - 2e)
                                                                  rDPO (Chowdhury et al. 2024)
  simpo    -log sigmoid(beta (pi_c/|c| - pi_r/|r|) - gamma)       SimPO (Meng et al. 2024), no reference
  orpo     -pi_c/|c| - beta log sigmoid(log odds_c - log odds_r), odds = p/(1-p), p = exp(pi/|len|)
                                                                  ORPO (Hong et al. 2024), no reference
  kto      per example, z0 = max(0, mean over the batch of the KL sequences' pi - ref), detached:
           desirable   w_d (1 - sigmoid(beta (rho - z0)))
           undesirable w_u (1 - sigmoid(beta (z0 - rho)))         KTO (Ethayarajh et al. 2024)

sft_weight adds sft_weight * (-pi_c / |c|) per pair (RPO, Pang et al. 2024: the chosen response's
NLL per token; TRL's "sft" term is the same mean taken over the batch's tokens). Losses are summed
over units and the step divides by the units of the whole step (pairs; kto: examples).

Metrics (TRL's names): rewards/chosen and rewards/rejected, beta * rho (simpo, orpo: beta times
the per-token log-prob), their difference rewards/margins, rewards/accuracies (share of pairs
with chosen reward > rejected reward), logps/chosen and logps/rejected (summed log-probs; simpo
and orpo: per token, as TRL logs them). kto reports rewards and logps over desirable (chosen) and
undesirable (rejected) examples separately, and kto/kl, the batch KL estimate z0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stagewise.data.batch import Batch
from stagewise.objectives.base import ObjectiveOutput, packing_kwargs, token_model

REFERENCE_FREE = ("simpo", "orpo")


def default_beta(loss: str) -> float:
    return 2.0 if loss == "simpo" else 0.1


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs [S], trained tokens [S]) of the S = 2U sequences of a preference batch. With
    batch.target_rows the output head scores only the trained positions (responses are often a few
    tokens of a long row, and the head over a large vocabulary is most of a small model's step)."""
    S = 2 * batch.labels.numel()
    if batch.target_rows is not None:
        rows = batch.target_rows
        lp = model.token_logprobs(batch.inputs, batch.targets, rows=rows, **packing_kwargs(batch)).reshape(-1)
        ids = batch.seq_ids.reshape(-1).index_select(0, rows)
    else:
        lp = model.token_logprobs(batch.inputs, batch.targets, **packing_kwargs(batch)).reshape(-1)
        ids = batch.seq_ids.reshape(-1)
        keep = ids >= 0
        lp, ids = lp[keep], ids[keep]
    logps = torch.zeros(S, dtype=torch.float32, device=lp.device).index_add(0, ids, lp)
    lens = torch.zeros(S, dtype=torch.float32, device=lp.device).index_add(0, ids, torch.ones_like(lp))
    return logps, lens


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(loss: str, beta: float, pc, pr, rc, rr, lc, lr, label_noise: float = 0.0,
                gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from summed log-probs pc/pr (policy), rc/rr
    (reference; ignored by simpo, orpo) and response lengths lc/lr, all [P]."""
    if loss in REFERENCE_FREE:
        ac, ar = pc / lc, pr / lr
        if loss == "simpo":
            out = -F.logsigmoid(beta * (ac - ar) - gamma)
        else:
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            out = -ac - beta * F.logsigmoid(log_odds)
        return out, beta * ac.detach(), beta * ar.detach()
    rho_c, rho_r = pc - rc, pr - rr
    d = rho_c - rho_r
    if loss == "sigmoid":
        out = -F.logsigmoid(beta * d)
    elif loss == "hinge":
        out = torch.relu(1 - beta * d)
    elif loss == "ipo":
        out = (rho_c / lc - rho_r / lr - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        e = label_noise
        out = (-(1 - e) * F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1 - 2 * e)
    else:
        raise AssertionError(f"unknown pair loss {loss!r}")
    return out, beta * rho_c.detach(), beta * rho_r.detach()


def kto_losses(beta: float, pol, ref, kl_pol, kl_ref, labels, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-example loss, rewards beta * rho, z0) of kto; labels 1.0 desirable, 0.0 undesirable."""
    z0 = (kl_pol - kl_ref).mean().detach().clamp(min=0)
    rho = pol - ref
    want = labels > 0.5
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (rho - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho)))
    return torch.where(want, desirable, undesirable), beta * rho.detach(), z0


class Preference:
    """The dpo stage's objective. reference: an object with `logps(model, batch) -> [S]` (the
    reference's summed log-probs of the batch's sequences, no gradient), None for simpo/orpo."""

    name = "dpo"

    def __init__(self, loss: str = "sigmoid", beta: float | None = None, reference=None, *, label_noise: float = 0.1,
                 simpo_gamma: float = 1.0, sft_weight: float = 0.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        assert (reference is None) == (loss in REFERENCE_FREE), (loss, reference)
        self.loss, self.beta, self.reference = loss, beta if beta is not None else default_beta(loss), reference
        self.label_noise, self.gamma, self.sft_weight = label_noise, simpo_gamma, sft_weight
        self.weights = (desirable_weight, undesirable_weight)
        self.unit = "examples" if loss == "kto" else "pairs"  # metrics.jsonl: pairs_per_s / examples_per_s

    def count(self, batch: Batch) -> int:
        return int(batch.labels.numel())

    def evaluate(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        return self(model, batch)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> ObjectiveOutput:
        assert token_model(model) is not None, "preference objectives need stagewise's Transformer"
        logps, lens = sequence_logps(model, batch)
        ref = None if self.reference is None else self.reference.logps(model, batch).to(logps.dtype)
        n = torch.tensor(batch.labels.numel(), device=logps.device)
        if self.loss == "kto":
            return self._kto(logps, ref, batch.labels.to(logps.device), n)
        pc, pr, lc, lr = logps[0::2], logps[1::2], lens[0::2].clamp(min=1), lens[1::2].clamp(min=1)
        rc, rr = (ref[0::2], ref[1::2]) if ref is not None else (None, None)
        per_pair, rew_c, rew_r = pair_losses(self.loss, self.beta, pc, pr, rc, rr, lc, lr, self.label_noise,
                                             self.gamma)
        if self.sft_weight:
            per_pair = per_pair + self.sft_weight * (-pc / lc)
        free = self.loss in REFERENCE_FREE
        shown_c, shown_r = (pc / lc, pr / lr) if free else (pc, pr)
        metrics = {"rewards/chosen": rew_c.sum(), "rewards/rejected": rew_r.sum(),
                   "rewards/accuracies": (rew_c > rew_r).float().sum(), "rewards/margins": (rew_c - rew_r).sum(),
                   "logps/chosen": shown_c.detach().sum(), "logps/rejected": shown_r.detach().sum()}
        return ObjectiveOutput(per_pair.sum(), n, metrics)

    def _kto(self, logps, ref, labels, n) -> ObjectiveOutput:
        pol, kl_pol = logps[0::2], logps[1::2].detach()
        per, rewards, z0 = kto_losses(self.beta, pol, ref[0::2], kl_pol, ref[1::2], labels, *self.weights)
        want = labels > 0.5
        d, u = want.float(), (~want).float()
        metrics = {"rewards/chosen": (rewards * d).sum(), "rewards/rejected": (rewards * u).sum(),
                   "logps/chosen": (pol.detach() * d).sum(), "logps/rejected": (pol.detach() * u).sum(),
                   "kto/kl": z0 * labels.numel()}
        counts = {"rewards/chosen": d.sum(), "logps/chosen": d.sum(), "rewards/rejected": u.sum(),
                  "logps/rejected": u.sum()}
        return ObjectiveOutput(per.sum(), n, metrics, counts)


def build_preference_objective(dpo, reference) -> Preference:
    return Preference(dpo.loss, dpo.beta, reference, label_noise=dpo.label_noise, simpo_gamma=dpo.simpo_gamma,
                      sft_weight=dpo.sft_weight, desirable_weight=dpo.desirable_weight,
                      undesirable_weight=dpo.undesirable_weight)
