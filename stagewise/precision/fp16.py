"""fp16 mixed precision with dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: normal numbers span 6.1e-5 .. 65504, subnormals reach 6e-8. Small
gradients underflow to zero and large activations overflow to inf. The recipe:

- fp32 master weights receive the update. Here the master copy *is* the model's parameters
  (so the optimizer, clipping and checkpoints see fp32 tensors and need no special path); the
  fp16 working copy of each weight is made per forward, by autocast on CUDA and by the
  emulation below on the CPU.
- The loss is multiplied by a scale S before backward, so gradients are S times larger while
  they live in fp16 and fewer underflow; they are divided by S (unscaled) in fp32 before
  clipping and the update.
- Dynamic S (`LossScaler`, torch.amp.GradScaler's rule): a non-finite gradient means S was too
  large — skip the step, S *= backoff; after growth_interval clean steps, S *= growth.

CPU emulation. fp16 GEMMs on a CPU are ~1000x slower than fp32, so on the CPU each op autocast
would run in fp16 (linear, matmul, bmm, scaled_dot_product_attention) instead computes in fp32
on inputs rounded to fp16, and its output is rounded to fp16. Each rounding is an autograd
op whose backward rounds the incoming gradient to fp16 too, so:
  forward:  weights, the inputs and outputs of every matmul are fp16 values;
  backward: the gradient of every matmul output, and the weight and input gradients it
            produces, are fp16 values (overflow to inf and flush to zero as on a GPU);
  fp32:     the GEMM accumulation (as on tensor cores), norms, softmax, RoPE, the residual
            stream, the loss, and the accumulation of weight gradients across micro-batches
            into the fp32 master .grad (as autocast does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from stagewise.precision.base import Precision
from stagewise.precision.telemetry import GradFormatStats


class LossScaler:
    """Dynamic loss scale with torch.amp.GradScaler's update rule, plus optional bounds.

    update(found_inf): on inf/NaN, scale *= backoff_factor and the clean-step count resets;
    otherwise the count grows, and at growth_interval the scale *= growth_factor (kept only if
    finite, as GradScaler does) and the count resets. The result is clamped to
    [min_scale, max_scale] (GradScaler has no bounds; the defaults are wide enough that a
    normal run never meets them).
    """

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 min_scale=0.0, max_scale=math.inf):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.growth_tracker = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                grown = self.scale * self.growth_factor
                if math.isfinite(grown):
                    self.scale = grown
                self.growth_tracker = 0
        self.scale = min(max(self.scale, self.min_scale), self.max_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])


class _RoundFP16(torch.autograd.Function):
    """x -> fp16(x) as fp32; the backward rounds the gradient to fp16 the same way."""

    @staticmethod
    def forward(ctx, x, record):
        ctx.record = record  # (GradFormatStats, weight name) when this weight's gradient is measured
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.record is not None:
            stats, name = ctx.record
            stats.add(name, grad)  # the fp32-computed gradient, before fp16 storage rounds it
        return grad.to(torch.float16).to(grad.dtype), None


class _FP16Emulation(TorchFunctionMode):
    """Rounds the inputs and outputs of the ops CUDA autocast runs in fp16 (see the module doc)."""

    OPS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
           F.scaled_dot_product_attention}

    def __init__(self, precision: "FP16Mixed"):
        super().__init__()
        self.precision = precision

    def _round(self, x):
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32):
            return x
        stats = self.precision._stats
        record = None
        if stats is not None and isinstance(x, torch.nn.Parameter) and torch.is_grad_enabled():
            record = (stats, self.precision._names.get(id(x), "?"))
        return _RoundFP16.apply(x, record)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        args, kwargs = tree_map(self._round, (args, kwargs))
        return tree_map(self._round, func(*args, **kwargs))


class FP16Mixed(Precision):
    name = "fp16-mixed"
    compute_dtype = torch.float16
    fused_loss = False  # the emulation rounds around F.linear; the fused loss would bypass it
    grad_format = torch.float16
    # Weights (the fp32 master) and their fp32 .grad; the fp16 working copy is autocast's, per forward.
    param_bytes, grad_bytes, master_bytes, optim_state_bytes = 4, 4, 0, 8

    def __init__(self, device, cfg=None):
        super().__init__(device, cfg)
        ls = self.cfg.loss_scale
        self.scaler = LossScaler(ls.init_scale, ls.growth_factor, ls.backoff_factor, ls.growth_interval,
                                 ls.min_scale, ls.max_scale)
        self.emulate = device.type != "cuda"
        if self.emulate:
            self.compute_dtype = torch.float32  # the emulated GEMMs run in fp32: MFU is against the fp32 peak
        self._stats: GradFormatStats | None = None

    def setup(self, model, keep=()):
        if self.emulate:
            # Without this, inductor (train.compile) fuses x.to(fp16).to(fp32) into a no-op and the
            # emulation silently disappears; with it, compiled and eager steps are bitwise equal.
            import torch._inductor.config as inductor_config

            inductor_config.emulate_precision_casts = True
        return super().setup(model, keep)

    def autocast(self):
        if self._stats is None and self.emulate and self.telemetry_due():
            self._stats = GradFormatStats(torch.float16)  # filled by the backward of the coming step
        return super().autocast()

    def compute_context(self):
        if self.emulate:
            return _FP16Emulation(self)
        return torch.autocast(device_type=self.device.type, dtype=torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        self._backward(loss.float() * self.scaler.scale)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self._metrics = {"loss_scale": self.scaler.scale}
        if self.telemetry_due():
            if self._stats is not None:
                self._metrics.update(self._stats.summary())
            else:  # CUDA: measure the fp32 .grad, still scaled, against fp16
                self._metrics.update(self._grad_telemetry(optimizer, scale=1.0))
            self._metrics.update(self._act_telemetry())  # activation gradients, still scaled
        self._stats = None
        inv = 1.0 / self.scaler.scale
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, inv)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
        # The global norm is non-finite exactly when some gradient element is inf/NaN (a finite
        # fp16-derived gradient cannot overflow an fp32 norm), so no extra pass is needed.
        # The host reads it (a sync, unlike the other modes): the scale is a Python float that the
        # next backward and the metrics use, and the scaler must stay GradScaler's rule exactly.
        applied = torch.isfinite(grad_norm)
        found_inf = not applied
        if not found_inf:
            optimizer.step()
        self.scaler.update(found_inf)
        self._count(applied)
        if found_inf or "grad_sampled" in self._metrics:
            self._metrics["skipped_steps"] = self.skipped
        return applied

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("mode") == self.name and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
