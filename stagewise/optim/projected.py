"""Adam in a low-rank subspace of each matrix's gradient: GaLore, Fira, APOLLO, APOLLO-Mini.

A covered m x n weight's gradient G is projected to r dimensions along its shorter side
(GaLore's rule, "projection side by shape"): m >= n projects from the right, R = G P^T with P r x n;
otherwise from the left, R = P^T G with P m x r. Adam's moments live at R's size, r x n or m x r
instead of m x n, which is the memory saved. P is refreshed every update_proj_gap steps of that
parameter (at its steps 0, gap, 2 gap, ...); the moments are kept across a refresh, as in the
reference implementations, though they were accumulated in the old subspace.

  galore  (Zhao et al. 2024)  P from the SVD of the current gradient (top-r singular vectors);
                              the update is scale * (the Adam direction of R, projected back).
  fira    (Chen et al. 2024)  GaLore plus the part of G outside the subspace, G - P(R), scaled per
                              row/column by ||Adam(R)|| / ||R|| so it moves like Adam would; a
                              norm-growth limiter caps that residual's norm at 1.01x its last value.
  apollo  (Zhu et al. 2025)   P a seeded Gaussian (N(0, 1/r)), no SVD: Adam runs on R only to
                              measure, per channel ("channel") or for the whole tensor ("tensor"),
                              how much Adam would rescale the gradient; the update is the full G
                              times that factor (and sqrt(scale)), under the same limiter.
  apollo-mini                 rank 1, tensor-wise scaling, scale 128 (the paper's setting): the
                              moments are two vectors, so optimizer memory is almost nil.

The Adam arithmetic follows the authors' code (Hugging Face's legacy AdamW): step size
lr * sqrt(1 - beta2^t) / (1 - beta1^t), direction m / (sqrt(v) + eps), decoupled decay applied
after the update (p -= lr * wd * p). With 8-bit moments (galore-8bit) the Adam part is
bitsandbytes' 8-bit AdamW, as GaLore's own 8-bit variant runs it: m_hat / (sqrt(v_hat) + eps).
Parameters a group does not project (embeddings, head, norms) take plain Adam in the same rule.

State per parameter, all tensors or ints so that checkpoints restore it bitwise: step; the
moments (optim/quantized.py Moments); projector (the SVD's P) or seed (APOLLO regenerates P from
it, the seed advancing at every refresh as apollo-torch's next_seed does); limiter_norm.
"""

from __future__ import annotations

import math

import torch

from stagewise.optim.quantized import MomentsOptimizer

KINDS = ("galore", "fira", "apollo")


def _side(shape, side: str) -> str:
    if side != "auto":
        return side
    return "right" if shape[0] >= shape[1] else "left"


def _svd_projector(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    # A copy, not a view: a view would keep all of U or Vh (min(m, n) columns) alive in the state.
    return (Vh[:rank, :] if side == "right" else U[:, :rank]).clone()


def _random_projector(shape, rank: int, side: str, seed: int, device) -> torch.Tensor:
    # Generated on the CPU from the seed alone, so a resumed run (or another device) rebuilds it exactly.
    gen = torch.Generator().manual_seed(seed)
    size = (rank, shape[1]) if side == "right" else (shape[0], rank)
    return (torch.randn(size, generator=gen) / math.sqrt(rank)).to(device)


def _next_seed(seed: int) -> int:
    """apollo-torch's seed chain: the 15th int64 a generator seeded with `seed` draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen).tolist()[-1]


def _project(grad, P, side):
    return grad @ P.t() if side == "right" else P.t() @ grad


def _project_back(low, P, side):
    return low @ P if side == "right" else P @ low


class ProjectedAdamW(MomentsOptimizer):
    """Groups with `rank` (and `kind`, `update_proj_gap`, `scale`, `side`, `scale_type`, `limiter`)
    are projected; other groups take plain Adam. bits: 32, or 8 for bitsandbytes-style 8-bit moments
    (galore-8bit)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 bits: int = 32, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}, bits)
        # APOLLO's first seeds: the parameter's 1-based position over all groups (apollo-torch's rule),
        # offset by the run's seed. Put into the state at the parameter's first step, not here: an
        # optimizer with state before its first step would look already initialised to DCP's loader.
        params = [p for group in self.param_groups for p in group["params"]]
        self._first_seed = {p: seed + i for i, p in enumerate(params, start=1)}

    def _refresh(self, group, p, state, grad, side):
        if group["kind"] == "apollo":
            state.setdefault("seed", self._first_seed[p])
            state["projector_seed"] = state["seed"]
            state["seed"] = _next_seed(state["seed"])
        else:
            state["projector"] = _svd_projector(grad, min(group["rank"], *grad.shape), side)

    def _projector(self, group, state, shape, side, device):
        if group["kind"] == "apollo":
            return _random_projector(shape, min(group["rank"], *shape), side, state["projector_seed"], device)
        return state["projector"]

    def _adam(self, group, state, grad) -> tuple[torch.Tensor, float]:
        """Update the moments with grad (fp32); return the Adam direction d and the step-size factor c
        (p -= lr * c * d). The 32-bit rule keeps the bias correction in c, outside d, as the references
        do: the Fira/APOLLO scaling factors and their limiter are measured on d alone."""
        beta1, beta2 = group["betas"]
        moments = self._moments_for(grad.device)
        if "moments_init" not in state:
            moments.init(state, grad)
            state["moments_init"] = 1
        state["step"] += 1
        t = state["step"]
        m, v = moments.load(state, grad.shape)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        moments.store(state, m, v)
        if self.bits == 32:
            return m / v.sqrt().add_(group["eps"]), math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        return (m / (1.0 - beta1 ** t)) / (v.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(group["eps"]), 1.0

    def _limit(self, state, x: torch.Tensor) -> torch.Tensor:
        """The norm-growth limiter (Fira, APOLLO): ||x|| may grow by at most 1.01x per step."""
        norm = torch.linalg.vector_norm(x)
        if "limiter_norm" in state:
            limiter = torch.clamp(norm / (state["limiter_norm"] + 1e-8), min=1.01) / 1.01
            x = x / limiter
            norm = norm / limiter
        state["limiter_norm"] = norm
        return x

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                full = p.grad.float()
                if "rank" not in group:
                    if wd and self.bits != 32:  # bitsandbytes decays before its update
                        p.mul_(1.0 - lr * wd)
                    direction, c = self._adam(group, state, full)
                    p.add_(direction, alpha=-lr * c)
                    if wd and self.bits == 32:
                        p.add_(p, alpha=-lr * wd)
                    continue
                side = _side(full.shape, group["side"])
                if state["step"] % group["update_proj_gap"] == 0:
                    self._refresh(group, p, state, full, side)
                P = self._projector(group, state, full.shape, side, full.device)
                low = _project(full, P, side)
                direction, c = self._adam(group, state, low)
                update = self._combine(group, state, full, low, direction, P, side)
                p.add_(update.to(p.dtype), alpha=-lr * c)
                if wd:
                    p.add_(p, alpha=-lr * wd)
        return loss

    def _combine(self, group, state, full, low, direction, P, side) -> torch.Tensor:
        kind, scale = group["kind"], group["scale"]
        if kind == "galore":
            return _project_back(direction, P, side) * scale
        # Channel norms run along the projected dimension (the references' norm_dim rule).
        dim = 0 if low.shape[0] < low.shape[1] else 1
        if kind == "fira":
            residual = full - _project_back(low, P, side) * scale
            factor = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
            residual = residual * (factor.unsqueeze(1) if dim == 1 else factor)
            if group["limiter"]:
                residual = self._limit(state, residual)
            return _project_back(direction, P, side) * scale + residual
        # apollo
        dim = 0 if full.shape[0] < full.shape[1] else 1
        if group["scale_type"] == "channel":
            factor = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
            factor = factor.unsqueeze(1) if dim == 1 else factor
        else:
            factor = torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + 1e-8)
        scaled = full * factor
        if group["limiter"]:
            scaled = self._limit(state, scaled)
        return scaled * math.sqrt(scale)
