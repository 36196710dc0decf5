"""Helpers of the continual pre-training experiments (domain A = code, B = Shakespeare)."""

from __future__ import annotations

from _common import HERE, curve, last

A = "{name: code, source: {kind: python-stdlib}}"
B = "{name: plays, source: {kind: shakespeare}}"
DOMAINS = ("code", "plays")


def stages(*items: str) -> str:
    return "--stages=[" + ", ".join(items) + "]"


def stage(name: str, steps: int, mixture: str, **extra) -> str:
    parts = [f"name: {name}", f"steps: {steps}", f"mixture: [{mixture}]"]
    parts += [f"{k}: {v}" for k, v in extra.items()]
    return "{" + ", ".join(parts) + "}"


def summarise(run: dict) -> tuple[dict, dict]:
    """Final per-domain validation loss (nats/token) and bits per byte, and their curves."""
    recs = run["metrics"]
    final, curves = {}, {}
    for d in DOMAINS:
        for key in (f"val_loss/{d}", f"val_bpb/{d}"):
            if any(key in r for r in recs):
                final[key] = last(recs, key)
                curves[key] = curve(recs, key)
    replay = [r["replay"] for r in recs if r.get("stage") == 1 and "replay" in r]
    if replay:
        final["replay"] = replay[-1]
    return final, curves


def a_tokenizer() -> str:
    """tokenizer.json of the BPE trained on domain A alone (what every A -> B run uses)."""
    from stagewise.config.loader import load_recipe
    from stagewise.data import resolve_dataset

    cfg = load_recipe(HERE / "continual_base.yaml", [f"--data.cache_dir={HERE / '.cache'}",
                                                     "--data.sources=[{kind: python-stdlib}]"])
    return str(resolve_dataset(cfg.data, log=lambda *a: None) / "tokenizer.json")
