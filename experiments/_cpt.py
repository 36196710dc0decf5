"""Helpers of the continual pre-training experiments (domain A = code, B = Shakespeare)."""

from __future__ import annotations

import json

from _common import HERE

A = "{name: code, source: {kind: python-stdlib}}"
B = "{name: plays, source: {kind: shakespeare}}"


def stages(*items: str) -> str:
    return "--stages=[" + ", ".join(items) + "]"


def stage(name: str, steps: int, mixture: str, **extra) -> str:
    parts = [f"name: {name}", f"steps: {steps}", f"mixture: [{mixture}]"]
    parts += [f"{k}: {v}" for k, v in extra.items()]
    return "{" + ", ".join(parts) + "}"


def val(recs: list[dict], domain: str) -> list[tuple[int, float]]:
    key = f"val_loss/{domain}"
    return [(r["step"], r[key]) for r in recs if key in r]


def forgetting(experiment: str, name: str) -> dict:
    return json.loads((HERE / "runs" / experiment / name / "forgetting.json").read_text())
