"""Memory: the plan's prediction by component, its measurement in the run, and the check before step 1.

  predict.py   components from the recipe alone (what `stagewise plan` prints)
  measure.py   the same components measured on one step (torch's MemTracker)
  budget.py    the check that stops a run whose predicted peak exceeds the device, naming what fits

RUN_DIR/memory.json holds, per stage, the settings, the prediction and the measurement
(`stagewise report` shows them side by side; docs/memory.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from stagewise.memory.budget import check_budget, predicted_peak
from stagewise.memory.predict import emulates_bf16, predict, state_total

from stagewise.rundir import MEMORY as MEMORY_FILE


def settings(cfg) -> dict:
    """What the prediction depends on, as memory.json records it."""
    return {"precision": cfg.precision.mode, "optimizer": cfg.optim.name, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "grad_accum": cfg.train.grad_accum,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "checkpoint_every": cfg.train.checkpoint_every, "adapter": cfg.adapter.kind}


def local_state_bytes(model, optimizer) -> dict[str, int]:
    """weights / gradients / optimizer: bytes of the tensors this process holds (a DTensor's local shard)."""
    import torch

    def nbytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"weights": sum(nbytes(p) for p in params), "gradients": sum(nbytes(p.grad) for p in params
                                                                        if p.grad is not None),
            "optimizer": sum(nbytes(v) for v in states)}


class StageMemory:
    """One stage's memory record: predicted at the start, measured at the probe step, peak RSS at the end."""

    def __init__(self, stage, mcfg, device, first_step: int, main: bool = True, probes: bool = True):
        """main: this process writes memory.json (rank 0); probes: the step may be measured (not under
        torch.distributed yet: the tracker does not see DDP's buckets or FSDP2's gathered weights)."""
        self.stage, self.path, self.device = stage, Path(stage.run_dir) / MEMORY_FILE, device
        self.main, self.probes = main, probes
        cfg = stage.cfg
        self.predicted = predict(cfg, mcfg, emulated_bf16=emulates_bf16(cfg.precision.mode, device))
        # The second step this process takes has the optimizer's states; a stage left with one step probes it.
        self.probe_step = first_step + (1 if stage.end() - first_step >= 2 else 0)
        self.record_ = {"settings": settings(cfg), "predicted": {
            **self.predicted, "state_total": state_total(self.predicted),
            "process": predicted_peak(self.predicted, device)}}
        self._write()  # the prediction, whether or not a step is measured

    def probe(self, trainee, step: int):
        cfg = self.stage.cfg
        # dpo/rl steps run a reference forward or generate outside the step: not probed (not yet supported)
        if step != self.probe_step or not cfg.memory.probe or getattr(trainee.model, "compiled", False) \
                or self.stage.kind in ("dpo", "rl") or not self.probes:
            return None
        from stagewise.memory.measure import MemoryProbe

        return MemoryProbe(trainee.model, trainee.optimizer, self.device)

    def after_step(self, probe, trainee, step: int, device) -> None:
        """After the step `probe()` was asked about: its measurement, or (torch.distributed) this rank's."""
        if probe is not None:
            self.record(probe, step, device)
        else:
            self.record_local(trainee, step, device)

    def record_local(self, trainee, step: int, device) -> None:
        """Under torch.distributed, at the probe step: the bytes of the weights, gradients and optimizer
        states this rank holds (its shards under fsdp2/hsdp), counted from the tensors themselves."""
        from stagewise.train.metrics import peak_memory_bytes

        if step != self.probe_step + 1 or self.probes:
            return
        self.record_["measured_rank"] = {**local_state_bytes(trainee.model, trainee.optimizer), "at_step": step,
                                         "process": peak_memory_bytes(device)}
        self._write()

    def record(self, probe, step: int, device) -> None:
        from stagewise.train.metrics import peak_memory_bytes

        self.record_["measured"] = {**probe.result(), "at_step": step}

        self.record_["measured"]["process"] = peak_memory_bytes(device)
        self._write()

    def finish(self, device) -> None:
        from stagewise.train.metrics import peak_memory_bytes

        if "measured" in self.record_:  # the process's high-water mark over the whole stage
            self.record_["measured"]["process"] = peak_memory_bytes(device)
            self._write()

    def _write(self) -> None:
        from stagewise.rundir import write_json

        if not self.main:
            return

        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data[self.stage.name] = self.record_
        write_json(self.path, data)


__all__ = ["MEMORY_FILE", "StageMemory", "check_budget", "predict", "settings", "state_total"]
