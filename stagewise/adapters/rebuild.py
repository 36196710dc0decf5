"""An adapter model back from disk: its base (checked against the recorded hash) plus its adapters.

Used where a path holds adapters rather than full weights: a training checkpoint of an adapter run
(trainable state only), and the merge report of `export-hf --merge` (which rebuilds the model as it
was trained, packed base included, and measures what merging changed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stagewise.adapters.apply import adapters, state_hash
from stagewise.adapters.peft_format import apply_adapter, read_adapter
from stagewise.errors import CheckpointError


def _base_model(meta: dict, mcfg, what: str):
    from stagewise import rundir
    from stagewise.model import Transformer

    from stagewise.train.setup import seed_everything

    base = meta.get("base")
    seed_everything(meta.get("seed", 0))  # a base trained from scratch is its seeded initialisation
    model = Transformer(mcfg)
    if base is not None:
        if not Path(base).exists():
            raise CheckpointError(f"{what}: its base {base} no longer exists; the adapters cannot be applied "
                                  "without it (the run's final/ export holds the merged weights)")
        rundir.load_weights(model, rundir.load_init_source(base)[1], f"base {base}")
    if meta.get("base_hash") and state_hash(model) != meta["base_hash"]:
        raise CheckpointError(f"{what}: its base {base} has changed since training (state hash "
                              f"{state_hash(model)[:12]}, recorded {meta['base_hash'][:12]})")
    return model


def _quant(meta: dict):
    q = meta.get("quant")
    return None if not q or q[0] == "none" else tuple(q)


def load_adapter_checkpoint(ckpt: Path, record: dict, mcfg) -> torch.nn.Module:
    """The model of a trainable-only checkpoint: base + adapters as trained (packed base included)."""
    from stagewise.checkpoint.export import load_model_state

    meta = dict(record["train_state"]["adapter"])
    model = _base_model(meta, mcfg, str(ckpt))
    tensors = {k: v for k, v in load_model_state(ckpt).items() if ".lora_" in k}
    apply_adapter(model, meta, tensors, str(ckpt), _quant(meta))
    return model


def trained_model(export_dir: Path, mcfg) -> torch.nn.Module:
    """The model an export's adapter.json describes, rebuilt as it was trained."""
    meta, tensors = read_adapter(export_dir)
    model = _base_model(meta, mcfg, str(export_dir))
    apply_adapter(model, meta, tensors, str(export_dir), _quant(meta))
    return model


@torch.no_grad()
def merge_report(trained: torch.nn.Module, mcfg, merged_state: dict, dtype: torch.dtype) -> str:
    """One line for a merge into a packed base: which weights it dequantized, and the largest logit
    change the merged weights (in the export dtype) cause against the model as trained, on a fixed
    probe of random tokens (2 rows, seed 0). Empty when no base weight was packed."""
    from stagewise.model import Transformer

    packed = {n: layer.packed.kind for n, layer in adapters(trained).items() if layer.packed is not None}
    if not packed:
        return ""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mcfg.vocab_size, (2, min(64, mcfg.max_seq_len)), generator=g)
    merged = Transformer(mcfg).eval()
    merged.load_state_dict({k: v.to(dtype).float() for k, v in merged_state.items()}, strict=False)
    diff = (trained.eval()(tokens) - merged(tokens)).abs()
    names = sorted(packed)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"merge: dequantized {len(names)} packed ({', '.join(sorted(set(packed.values())))}) base weights into "
            f"{str(dtype).removeprefix('torch.')} ({shown}); merged vs as trained (packed base + adapters), "
            f"logits on {tokens.numel()} probe tokens: max |diff| {diff.max().item():.3g}, mean "
            f"{diff.mean().item():.3g}")

