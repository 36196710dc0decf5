"""Throughput, MFU, memory and the metrics.jsonl log.

MFU (model FLOPs utilisation) = flops_per_token * tokens_per_second / peak_flops, where
  flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len
(PaLM, Chowdhery et al. 2022, appendix B): 6 FLOPs per matmul weight per token for forward
(2) and backward (4), plus the attention score and value matmuls over the full T x T
matrix. N_matmul counts every weight used in a matmul, the output head included (also when
tied to the embedding), and excludes the embedding lookup and norm gains. peak_flops is
not a datasheet number: it is measured once per machine, thread count and dtype by timing
large square matmuls (see `measure_peak_flops`) and cached, so MFU says how close training
gets to what this machine's GEMM actually reaches. The cache records when it was measured and
under what load (load average, CPU count), since a peak taken on busy cores is too low;
`stagewise plan --measure-peak` re-measures it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


PEAK_ENV = "STAGEWISE_PEAK_FLOPS"


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak on GPU; peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # VmHWM is this process image's own high-water mark. getrusage's ru_maxrss is not: Linux
    # carries it over fork+exec, so a child started by a large parent reports the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stagewise"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    cache = _read_cache(path)  # re-read: another process may have added its own entries meanwhile
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def _conditions() -> dict:
    """When and under what load a machine number was measured: a GEMM peak taken while other jobs
    share the cores is low, and every MFU computed from it too high."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"measured_at": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in load] if load else None, "cpus": os.cpu_count()}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of an n x n x n matmul in `dtype` (n=2048 CPU, 8192 GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call pays for kernel selection / thread pool start
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{_device_name(device)}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}"


def peak_flops_entry(device: torch.device, dtype: torch.dtype, measure: str = "if-missing") -> dict | None:
    """The cached peak for this device/threads/dtype as {"flops", "measured_at", "loadavg", "cpus",
    "threads"}; measure "if-missing" (and cache it), "always" (re-measure), or "never" (None if absent).
    An entry cached before the conditions were recorded (a bare float) reads as {"flops": value}."""
    key, path = peak_key(device, dtype), _cache_dir() / "peak_flops.json"
    entry = _read_cache(path).get(key)
    if isinstance(entry, (int, float)):
        entry = {"flops": float(entry)}
    if measure == "always" or (entry is None and measure == "if-missing"):
        entry = {"flops": measure_peak_flops(device, dtype), **_conditions(), "threads": torch.get_num_threads()}
        _write_cache(path, key, entry)
    return entry


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured peak for this device/threads/dtype, cached on disk; STAGEWISE_PEAK_FLOPS overrides."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    return float(peak_flops_entry(device, dtype)["flops"])


# What a training process has imported before it builds anything: the interpreter, torch, stagewise's
# training stack. Measured in a fresh interpreter, as the high-water mark peak_memory_bytes reads.
_OVERHEAD_PROBE = ("import stagewise.cli, stagewise.commands, stagewise.train.runner, stagewise.train.stages\n"
                   "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])")


def process_overhead(measure: str = "if-missing") -> dict | None:
    """Peak RSS of a fresh process with torch and stagewise imported, {"bytes", "measured_at", ...};
    measured once per machine, Python and torch version, and cached beside the GEMM peak. None
    where it cannot be measured (no /proc: not Linux) or with measure "never" and nothing cached."""
    key = f"{_device_name(torch.device('cpu'))}|python={platform.python_version()}|torch={torch.__version__}"
    path = _cache_dir() / "process_overhead.json"
    entry = _read_cache(path).get(key)
    if measure == "always" or (entry is None and measure == "if-missing"):
        try:
            out = subprocess.run([sys.executable, "-c", _OVERHEAD_PROBE], capture_output=True, text=True,
                                 timeout=300, check=True).stdout
            entry = {"bytes": int(out.split()[-1]) * 1024, **_conditions()}
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None
        _write_cache(path, key, entry)
    return entry


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per optimizer step, flushed per line.

    On resume, lines for steps after the checkpoint are dropped first, so the file of a
    killed-and-resumed run holds each step exactly once, like an uninterrupted run.
    sink: the run's experiment trackers (stagewise/trackers.py), sent every line this file keeps.
    """

    def __init__(self, path: Path, resume_step: int | None = None, sink=None):
        self.path, self.sink = path, sink
        if resume_step is not None and path.exists():
            kept = self._keep_through(resume_step)
            if sink is not None:  # lines before the checkpoint are final: what a killed run had not sent yet
                sink.catch_up([json.loads(line) for line in kept], resume_step)
        self._f = open(path, "a", encoding="utf-8")

    def _keep_through(self, step: int) -> list[str]:
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return kept

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.sink is not None:
            self.sink.send(record)

    def truncate(self, step: int) -> None:
        """Drop the lines of steps after `step` (a rollback undid them)."""
        self._f.close()
        self._keep_through(step)
        if self.sink is not None:
            self.sink.drop_after(step)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


class NullMetricsLog:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _step_of(line: str):
    try:
        return json.loads(line).get("step")
    except ValueError:
        return None  # a line cut short by a kill
