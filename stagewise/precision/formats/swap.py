"""Swap nn.Linear modules for precision wrappers by name, from outside the model (the model never imports precision)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None],
                 skip: Callable[[str], bool] | None = None) -> list[str]:
    """Replace each nn.Linear `name` (not skipped) by make(name, linear); make may return None to keep it.

    Use `skip` to keep embeddings' neighbours, the output head or chosen layers in high
    precision. The wrappers here hold the linear's own Parameter objects, so optimizer state and
    state-dict keys are unchanged. Returns the swapped names, in module order.
    """
    swapped = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or not name or (skip is not None and skip(name)):
            continue
        new = make(name, mod)
        if new is None or new is mod:
            continue
        _set(model, name, new)
        swapped.append(name)
    return swapped


def unswap(model: nn.Module) -> list[str]:
    """Turn every wrapper with a `to_linear()` back into a plain nn.Linear (same Parameters); returns names."""
    names = [n for n, m in model.named_modules() if n and hasattr(m, "to_linear")]
    for n in names:
        _set(model, n, model.get_submodule(n).to_linear())
    return names
