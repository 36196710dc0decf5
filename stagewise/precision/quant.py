"""fp8 training and fake-quantised (QAT) formats: linears swapped, everything else bf16-mixed.

The numerics live in stagewise/precision/formats/ (its docstring cites every rule); this file
only decides which modules get which wrapper. Every nn.Linear whose name matches none of
`precision.keep_high_precision` (fnmatch patterns; default: embeddings, norms, output head)
is replaced, from outside the model, by a wrapper holding the *same* Parameters, so the
optimizer, checkpoints and exports see the model unchanged:

  fp8      Float8Linear: x, W -> e4m3, grad_out -> e5m2, scaled per tensor (current | delayed |
           none), fp32 accumulation; the delayed-scaling amax histories are precision state and
           go into every checkpoint.
  mxfp4, nvfp4, int8, int4, ternary
           QuantLinear: straight-through fake quantisation of the weight, optionally of the input
           (ternary uses int8 per-token activations, as BitNet b1.58) and of the output gradient.

The fp32 master weights, AdamW and the rest of the network are exactly bf16-mixed.
"""

from __future__ import annotations

import fnmatch

import torch

from stagewise.precision.base import BF16Mixed
from stagewise.precision.formats import Float8Linear, QuantLinear, swap_linears, unswap

FAKE_QUANT = ("mxfp4", "nvfp4", "int8", "int4", "ternary")


class _Swapped(BF16Mixed):
    wrapper: type = object
    # The swapped linears' backward keeps state (delayed-scaling amax histories, cast counters) that
    # a second, reference backward would change: activation gradients get the direct counts only.
    act_grad_reference = False

    def setup(self, model, keep=()):
        model = super().setup(model, keep)
        patterns = list(self.cfg.keep_high_precision)
        self.swapped = swap_linears(model, self._make,
                                    skip=lambda n: any(fnmatch.fnmatch(n, p) for p in patterns) or self.keeps(n))
        self._modules = {n: model.get_submodule(n) for n in self.swapped}
        return model

    def _make(self, name, linear):
        raise NotImplementedError

    def teardown(self, model):
        unswap(model)
        self._modules = {}
        return super().teardown(model)

    def autocast(self):
        self._set_counting(self.telemetry_due())
        return super().autocast()

    def _set_counting(self, on: bool) -> None:
        pass

    def step(self, optimizer, grad_norm) -> torch.Tensor:
        due = self.telemetry_due()
        applied = super().step(optimizer, grad_norm)
        if due:
            self._metrics.update(self._format_telemetry())
        return applied

    def _format_telemetry(self) -> dict:
        return {}


class FP8Mixed(_Swapped):
    name = "fp8"

    def _make(self, name, linear):
        f = self.cfg.fp8
        return Float8Linear(linear, scaling=f.scaling, history_len=f.amax_history_len, telemetry=False)

    def _set_counting(self, on):
        for m in self._modules.values():
            m.count_casts = on

    def _format_telemetry(self):
        """Per role (input, weight, grad): saturated and underflowed element fractions over all fp8
        linears of the last micro-batch, as fp8_cast_counts defines them."""
        tot: dict[str, list[float]] = {}
        for m in self._modules.values():
            t = m.telemetry()
            for role in ("input", "weight", "grad"):
                if f"{role}.numel" in t:
                    acc = tot.setdefault(role, [0.0, 0.0, 0.0])
                    acc[0] += t[f"{role}.saturated"]
                    acc[1] += t[f"{role}.underflowed"]
                    acc[2] += t[f"{role}.numel"]
        out = {}
        for role, (sat, under, n) in tot.items():
            out[f"fp8_{role}_saturated_frac"] = sat / max(n, 1)
            out[f"fp8_{role}_underflow_frac"] = under / max(n, 1)
        # Per layer: the amax each cast saw and the scale it used (scale * amax <= the format's max).
        out["fp8_layers"] = {name: {k.replace(".", "_"): v for k, v in m.telemetry().items()
                                    if k.endswith((".amax", ".scale"))} for name, m in self._modules.items()}
        return out

    def state_dict(self):
        return {**super().state_dict(), "fp8_scalers": {n: m.scaler_state_dict() for n, m in self._modules.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("mode") == self.name:
            for n, s in state.get("fp8_scalers", {}).items():
                if n in self._modules:
                    self._modules[n].load_scaler_state_dict(s)


class _FakeQuant(_Swapped):
    def _make(self, name, linear):
        q = self.cfg.quant
        side = "int8" if self.name == "ternary" else self.name  # BitNet b1.58: int8 activations
        return QuantLinear(linear, weight_format=self.name, act_format=side if q.activations else None,
                           grad_format=side if q.gradients else None,
                           group_size=q.group_size if self.name == "int4" else None, hadamard=q.hadamard)

    def _format_telemetry(self):
        """Mean over the swapped linears of each {role}.{underflow, clipped} fraction QuantLinear reports."""
        sums: dict[str, list[float]] = {}
        for m in self._modules.values():
            for k, v in m.telemetry().items():
                acc = sums.setdefault(k, [0.0, 0])
                acc[0] += v
                acc[1] += 1
        return {f"quant_{k.replace('.', '_')}_frac": s / n for k, (s, n) in sums.items()}


QUANT_MODES = [FP8Mixed] + [type(f"FakeQuant_{n}", (_FakeQuant,), {"name": n}) for n in FAKE_QUANT]
