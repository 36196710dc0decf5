"""JSON for what a checkpoint keeps outside DCP: optimizer hyperparameters and non-tensor state.

Tuples and small tensors are tagged so they come back as they went in: AdamW's `betas`
as a tuple, a tensor `lr` (capturable / compiled optimizers) as a tensor. Floats are
written with `repr`, which round-trips every float64 (and so every lower precision) exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from stagewise.errors import CheckpointError

_MAX_TENSOR_NUMEL = 64  # a hyperparameter, not state: anything bigger belongs in DCP


def encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() <= _MAX_TENSOR_NUMEL:
        t = value.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t
        values = t.cpu().flatten().tolist()
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": values}}
    raise CheckpointError(
        f"optimizer value {where} is a {type(value).__name__}; "
        "valid are numbers, strings, None, tuples, lists, dicts and tensors of at most 64 elements"
    )


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(decode(v) for v in value["__tuple__"])
        if set(value) == {"__tensor__"}:
            t = value["__tensor__"]
            return torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
        return {k: decode(v) for k, v in value.items()}
    return value


def first_unjsonable(value: Any, where: str) -> tuple[str, str] | None:
    """(path, type name) of the first value `json.dumps` would reject, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k is not None and not isinstance(k, (str, int, float, bool)):
                return f"{where} key {k!r}", type(k).__name__
            found = first_unjsonable(v, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = first_unjsonable(v, f"{where}[{i}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return where, type(value).__name__
