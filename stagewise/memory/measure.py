"""Measuring a training step's memory by component, the way `plan` predicts it.

One step of each run (the probe step: the second this process takes, when optimizer states
exist; the first if it takes only one) runs under torch's MemTracker
(torch.distributed._tools.mem_tracker), a dispatch mode that accounts every tensor storage an op
creates until it is freed, on any device, and labels it: parameters and buffers, gradients,
optimizer states, activations (forward) and temporaries (backward). From it:

  weights      parameter + buffer storages
  gradients    gradient storages after the backward
  optimizer    optimizer-state storages after the step (what persists)
  activations  tensors live at the end of the forward (outside autocast, whose weight cache is then
               freed): what the blocks keep for the backward (less under activation checkpointing)
               and what the loss keeps (the fused loss's stored head gradient)
  loss_peak    the loss's working set: the forward's highest point beyond what was live when the
               trunk's last norm had run (the loss's chunk buffers)
  peak         the highest total of tracked storages during the whole step

Tensors that exist before the step and are not the model's (a DPO/RL reference copy, the batch)
are not in the tracker. The process's peak RSS (VmHWM) and, on CUDA, the allocator's max allocated
are recorded beside them. The probe step is slower (every op passes through Python): memory.json's
measured.at_step names it, so that timing analyses can leave it out (metrics.jsonl stays the same
whether or not a run was resumed); it changes no value the step computes. Compiled blocks run outside the
dispatch mode, so with train.compile the probe is skipped.
"""

from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

_TOTAL = "Total"


class _NoHook:
    def remove(self) -> None:
        pass


class _Tracker(MemTracker):
    """MemTracker that also keeps each label's own maximum over the step, and leaves frozen parameters
    (an adapter run's base) without the gradient hook it cannot register on them."""

    def __init__(self):
        super().__init__()
        self.maxima: dict = {}

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        for dev, snap in self._curr_mem_snap.items():
            seen = self.maxima.setdefault(dev, {})
            for key, value in snap.items():
                if value > seen.get(key, 0):
                    seen[key] = value


class MemoryProbe:
    """Context for one train_step (its observer): `with probe: train_step(..., observer=probe)`;
    then `probe.result()` is the components dict (bytes)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.tracker = _Tracker()
        self.points: dict[str, dict] = {}
        self._handle = None

    def _now(self) -> dict:
        snap = self.tracker.get_tracker_snapshot("current")
        return next(iter(snap.values()), {}) if len(snap) <= 1 else _sum_devices(snap)

    def _mark(self, name: str) -> None:
        if name not in self.points:  # the first micro-batch's
            self.points[name] = dict(self._now())

    def forward_done(self) -> None:
        if "forward" not in self.points:
            self.forward_max = {k: dict(v) for k, v in self.tracker.maxima.items()}
        self._mark("forward")

    def micro_done(self) -> None:
        """A micro-batch's backward is done: MemTracker refuses a second forward of the root module in
        one tracking session (it takes it for the next iteration) unless its module stats are cleared.
        The probe reads only its own snapshots and maxima, which stay."""
        self.tracker.reset_mod_stats()

    def backward_done(self) -> None:
        self.points["backward"] = dict(self._now())

    def __enter__(self):
        self.tracker.track_external(self.model, self.optimizer)
        norm = getattr(self.model, "norm", None)
        if isinstance(norm, torch.nn.Module):
            self._handle = norm.register_forward_hook(lambda m, i, o: self._mark("trunk"))
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)
        if self._handle is not None:
            self._handle.remove()
        self.points["end"] = dict(self._now())

    def result(self) -> dict:
        end, fwd = self.points["end"], self.points.get("forward", {})
        trunk = self.points.get("trunk", fwd)
        maxima, fmax = (_sum_devices(m) if len(m) > 1 else next(iter(m.values()), {})
                        for m in (self.tracker.maxima, getattr(self, "forward_max", {})))
        act = _MemRefType.ACT
        out = {
            "weights": end.get(_MemRefType.PARAM, 0) + end.get(_MemRefType.BUFFER, 0),
            "gradients": self.points.get("backward", {}).get(_MemRefType.GRAD, 0),
            "optimizer": end.get(_MemRefType.OPT, 0),
            "activations": fwd.get(act, 0),
            "loss_peak": max(0, fmax.get(act, 0) - trunk.get(act, 0)) if "trunk" in self.points else 0,
            "peak": maxima.get(_TOTAL, 0),
        }
        return out


def _sum_devices(snaps: dict) -> dict:
    total: dict = {}
    for snap in snaps.values():
        for k, v in snap.items():
            total[k] = total.get(k, 0) + v
    return total
