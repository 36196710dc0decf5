"""Random-number-generator state as plain JSON, so a resumed run draws the same numbers.

Three generators matter to a training run: Python's `random` (shuffles in data code),
NumPy's legacy global generator (`np.random.*`) and torch's (dropout, init, sampling).
Each state is stored losslessly: integers as integers, torch's byte states as base64.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

from stagewise.errors import CheckpointError

RNG_KEYS = ("python", "numpy", "torch")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """The current python/numpy/torch (and CUDA, if present) generator states, JSON-able."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _b64(torch.get_rng_state()),
        # Only the current device: reading every device's state would create a CUDA
        # context on each GPU from each rank.
        "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator to a state produced by `capture_rng`.

    A saved CUDA state is ignored when resuming on a machine without CUDA.
    """
    if not isinstance(state, dict) or any(k not in state for k in RNG_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"rng state must be a dict from capture_rng() with keys {list(RNG_KEYS)}; found {found}")
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (
                npy["kind"],
                np.asarray(npy["keys"], dtype=np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(_from_b64(state["torch"]))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(_from_b64(state["cuda"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        kind = type(e).__name__
        raise CheckpointError(f"rng state is malformed ({kind}); expected the dict from capture_rng()") from None
