"""Pure bf16: weights, gradients and AdamW states all bf16, no fp32 master copy.

bf16 keeps 8 significant bits: near a weight of 1.0 its spacing is 2^-7 = 0.0078, so an update
smaller than half of that (0.0039) rounds away entirely — late in training, with a small LR,
most updates are lost. Two remedies, usable together:

- stochastic rounding (SR): round the new weight up or down with probability proportional to
  the distance, so E[SR(x)] = x and small updates survive on average (Gupta et al. 2015;
  Zamirai et al. 2020 for bf16 training).
- Kahan compensated summation (Collage, Yu et al. 2024): a second bf16 buffer c per weight
  carries the part of the last update that rounding dropped, and it is added back next step:
      t = w + c + u (in fp32);  w' = round(t);  c' = round_nearest(t - w')
  The effective weight is the pair's sum w + c. Each step it equals t up to the rounding of c' to
  bf16: half a bf16 ulp of c', and since |c'| is at most half an ulp of w', at most 2^-17 |w'|
  (the pair holds w + c to ~17 significant bits; the two fp32 sums in t add ~2^-23 |w|). These
  per-step errors are not compensated: with the same update every step they have the same sign
  every step and the pair drifts from the exact sum linearly (+2.8% of the summed updates after
  1000 steps of 1e-4 on weights of 1.0; tests/test_precision_telemetry.py, docs/precision.md).

The update itself is AdamW computed in fp32 from the bf16 state (CompensatedAdamW): states
and the compensation buffer are rounded to nearest when stored; only the weight uses SR.
"""

from __future__ import annotations

import torch

from stagewise.precision.base import Precision
from stagewise.precision.telemetry import LostUpdate

_SR_SEED = 0x5EED


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with P(away from zero) = the discarded fraction.

    bf16 is the top 16 bits of fp32: adding a uniform random 16-bit integer to the low half of
    the bit pattern and truncating carries into the kept bits with exactly that probability
    (for either sign, since the pattern is sign-magnitude). inf/NaN pass through unchanged.
    """
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)  # the cast is exact now


class CompensatedAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters: fp32 arithmetic, bf16 storage, SR and/or Kahan on the weight.

    State per parameter (all checkpointed with the optimizer): step, exp_avg, exp_avg_sq (bf16)
    and, with kahan, `compensation` (bf16). SR draws come from a generator seeded from
    (sr_seed, step), so a resumed run draws the same numbers without saving generator state.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 stochastic_rounding=False, kahan=False, sr_seed=_SR_SEED):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=stochastic_rounding, kahan=kahan, sr_seed=sr_seed)
        super().__init__(params, defaults)
        self.lost: LostUpdate | None = None  # set by the precision on telemetry steps

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                if group["kahan"] and "compensation" not in state:  # also after a schedule switch kept AdamW state
                    state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                t = int(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                w = p.float()
                # Decoupled weight decay and the Adam step, both relative to the stored weight.
                update = (m / (1 - beta1 ** t)).div_(denom).mul_(-lr).sub_(w * (lr * wd))
                target = w + update
                if group["kahan"]:
                    comp = state["compensation"].float()
                    target += comp
                if group["stochastic_rounding"]:
                    gen = torch.Generator(device=p.device).manual_seed(group["sr_seed"] * 1_000_003 + t)
                    new = stochastic_round_bf16(target, gen)
                else:
                    new = target.to(p.dtype)
                if group["kahan"]:
                    state["compensation"].copy_(target - new.float())
                if self.lost is not None:  # the effective weight moves, w or (with Kahan) w + c
                    before, after = w.double(), new.double()
                    if group["kahan"]:
                        before, after = before + comp.double(), after + state["compensation"].double()
                    self.lost.add(before, after, update)
                p.copy_(new)
        return None


def _cast_floats(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _inputs_to_fp32(module, args):
    return _cast_floats(args, torch.float32)


def _output_to_bf16(module, args, output):
    return _cast_floats(output, torch.bfloat16)


class BF16Pure(Precision):
    name = "bf16-pure"
    compute_dtype = torch.bfloat16
    grad_format = torch.bfloat16
    param_bytes, grad_bytes, master_bytes, optim_state_bytes = 2, 2, 0, 4  # +2 with kahan (see plan)

    def setup(self, model, keep=()):
        model = super().setup(model, keep)
        # Parameters only: buffers (RoPE tables) stay fp32 and are cast where they are used.
        for name, p in model.named_parameters():
            if not self.keeps(name.rpartition(".")[0]):
                p.data = p.data.to(torch.bfloat16)
        # A kept module holds fp32 weights among bf16 activations: it computes in fp32 on its own
        # inputs and hands bf16 on, so the rest of the model sees the compute dtype throughout.
        self._kept_hooks = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
            if own and self.keeps(name) and all(p.dtype == torch.float32 for p in own):
                self._kept_hooks += [module.register_forward_pre_hook(_inputs_to_fp32),
                                     module.register_forward_hook(_output_to_bf16)]
        return model

    def teardown(self, model):
        for hook in getattr(self, "_kept_hooks", ()):
            hook.remove()
        self._kept_hooks = []
        for p in model.parameters():
            p.data = p.data.float()
        return super().teardown(model)

    def setup_optimizer(self, optimizer):
        # Same groups and hyperparameters as the configured AdamW, a bf16-aware update rule.
        d = optimizer.defaults
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay", "betas", "eps")}
                  for g in optimizer.param_groups]
        return CompensatedAdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                weight_decay=d["weight_decay"], stochastic_rounding=self.cfg.stochastic_rounding,
                                kahan=self.cfg.kahan)

    def step(self, optimizer, grad_norm) -> torch.Tensor:
        if not (self.telemetry_due() and isinstance(optimizer, CompensatedAdamW)):
            return super().step(optimizer, grad_norm)
        optimizer.lost = lost = LostUpdate()
        try:
            applied = super().step(optimizer, grad_norm)
        finally:
            optimizer.lost = None
        if lost.value() is not None:
            self._metrics["lost_update_frac"] = lost.value()
            self._metrics["lost_update_along_frac"] = lost.along()
        return applied
