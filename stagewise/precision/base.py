"""The precision component: the only place the training loop asks about numerics.

The step function calls a Precision at fixed points, in this order:

    model = precision.setup(model)            # once: cast / wrap modules, keep master copies
    with precision.autocast(): loss = ...     # forward under the compute dtype
    precision.backward(loss)                  # scales the loss if the mode uses loss scaling
    precision.unscale_(optimizer)             # gradients back to true scale, before clipping
    applied = precision.step(optimizer, grad_norm)   # the optimizer-step hook: may skip the step
    precision.state_dict() / load_state_dict()       # goes into every checkpoint

fp32 and bf16-mixed (autocast, fp32 master weights and optimizer states) live here;
fp16 with dynamic loss scaling, pure bf16, fp8 and fake-quant formats plug in as
further subclasses without touching the loop.
"""

from __future__ import annotations

import contextlib
import math

import torch

from stagewise.config.schema import PrecisionConfig


class Precision:
    name = "fp32"
    compute_dtype = torch.float32
    param_bytes = 4       # bytes per parameter of the weights the optimizer updates
    grad_bytes = 4
    optim_state_bytes = 8  # AdamW: exp_avg + exp_avg_sq in fp32

    def __init__(self, device: torch.device):
        self.device = device

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> bool:
        """Apply the update unless the gradients are non-finite; return whether it was applied.

        Without loss scaling a non-finite gradient is a real divergence, not an overflow to
        recover from: the step is skipped (weights stay finite) and the caller reports it.
        """
        if not math.isfinite(float(grad_norm)):
            return False
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"mode": self.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.name:
            # A precision schedule may legitimately change modes; fp32/bf16 carry no state.
            pass


class BF16Mixed(Precision):
    """bf16 autocast for matmuls; weights, gradients and AdamW states stay fp32.

    bf16 has fp32's exponent range, so gradients do not underflow and no loss scaling is
    needed (unlike fp16, Micikevicius et al. 2018).
    """

    name = "bf16-mixed"
    compute_dtype = torch.bfloat16

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


_MODES = {"fp32": Precision, "bf16-mixed": BF16Mixed}


def build_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    return _MODES[cfg.mode](device)
