"""The check before the first step: does the predicted peak fit the device, and if not, what would.

memory.limit auto compares with the device's memory — CUDA: the GPU's total memory; CPU:
MemAvailable from /proc/meminfo when the run starts (free memory plus what the kernel can
reclaim), since a CPU process competes with everything else on the machine. The predicted peak is
the tracked peak of a step (memory/predict.py) plus a reference copy, and on the CPU the
process's fixed overhead (the interpreter with torch imported, measured once per machine).
When it does not fit, the one-line error says by how much and lists single changes that would fit:
a smaller train.batch_size (with grad_accum raised to keep the tokens per step), activation
checkpointing, a lighter optimizer.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from stagewise.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, where: str = "memory.limit") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{where}: expected auto, null or a size such as 8GiB, 512MiB or 2e9 bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what they are) of the memory a run on `device` may use; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{device} total memory"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None, "unknown"


def predicted_peak(components: dict, device: torch.device) -> int:
    peak = components["peak"] + components.get("reference", 0)
    if device.type != "cuda":
        peak += components.get("snapshot", 0)  # on a GPU the snapshot is in host memory, not the device's
        from stagewise.train.metrics import process_overhead

        overhead = process_overhead()
        peak += overhead["bytes"] if overhead else 0
    return peak


def _variants(cfg):
    """(what to write, config) for the single changes the error may propose."""
    B, A = cfg.train.batch_size, cfg.train.grad_accum
    b = B // 2
    while b >= 1:
        yield (f"train.batch_size={b} with train.grad_accum={A * B // b}" if B % b == 0 else f"train.batch_size={b}",
               dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=b, grad_accum=A * max(1, B // b))))
        b //= 2
    for mode in ("selective", "full"):
        if cfg.train.activation_checkpointing != mode and mode != "none":
            yield (f"train.activation_checkpointing={mode}",
                   dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=mode,
                                                                      checkpoint_every=1)))
    if cfg.precision.mode != "bf16-pure" and cfg.adapter.kind == "none":
        for name in ("adamw-8bit", "galore-8bit", "apollo-mini"):
            if cfg.optim.name != name:
                yield f"optim.name={name}", dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name=name))


def check_budget(cfg, components: dict, mcfg, device: torch.device, predict_fn) -> None:
    """Raise a one-line ConfigError when the predicted peak exceeds memory.limit."""
    if cfg.memory.limit is None:
        return
    if str(cfg.memory.limit).lower() == "auto":
        cap, what = device_memory(device)
        if cap is None:
            return
    else:
        cap, what = parse_size(cfg.memory.limit), "memory.limit"
    need = predicted_peak(components, device)
    if need <= cap:
        return
    fits, batch_seen = [], False
    for text, variant in _variants(cfg):
        if text.startswith("train.batch_size") and batch_seen:
            continue
        peak = predicted_peak({**predict_fn(variant, mcfg), "reference": components.get("reference", 0)}, device)
        if peak <= cap:
            batch_seen |= text.startswith("train.batch_size")  # the largest batch that fits is enough
            fits.append(f"{text} ({gib(peak)})")
    hint = "; would fit: " + ", ".join(fits) if fits else "; no single change of batch size, checkpointing or " \
        "optimizer fits (a smaller model or data.seq_len, or memory.limit: null to run anyway)"
    raise ConfigError(f"memory: predicted peak {gib(need)} exceeds {what} {gib(cap)} by {gib(need - cap)} "
                      f"({cfg.precision.mode}, optim {cfg.optim.name}, batch {cfg.train.batch_size} x "
                      f"{cfg.data.seq_len}, checkpointing {cfg.train.activation_checkpointing}){hint}")
