"""Parameter-efficient fine-tuning: LoRA / DoRA adapters on a frozen, optionally packed base.

The transform sits second in train/setup.py's order (precision swaps -> adapters -> compile ->
sharding). A stage with `adapter.kind: lora | dora`:
  * starts from its base (init_from, the previous stage's export, or its seeded initialisation),
    whose state hash its checkpoints record; a resume on another base is refused;
  * freezes every base parameter; the optimizer holds only the adapters' (LoRA+: B at a larger lr);
  * writes checkpoints of the trainable state only (adapter weights, A0/B0 of base-moving inits,
    optimizer, data, RNG), and exports merged weights plus the adapter itself (adapter.safetensors,
    adapter.json) to RUN_DIR/final and RUN_DIR/stages/<name>; `stagewise export-peft` turns that into
    a Hugging Face PEFT adapter (adapters/peft_format.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from stagewise.adapters.apply import (DATA_INITS, adapters, attach, check_ranks, collect_inputs,
                                      eva_ranks, init_from_weights, lora_ga_factors, match_targets, mean_gradients,
                                      merged_state_dict, settle, state_hash)
from stagewise.adapters.peft_format import write_adapter_files
from stagewise.config.schema import AdapterConfig
from stagewise.errors import CheckpointError, ConfigError
from stagewise.objectives.base import packing_kwargs

# Precision modes an adapter stage runs in; the others swap or cast the very weights the adapters
# freeze (docs/adapters.md says why each is refused).
ADAPTER_PRECISIONS = ("fp32", "tf32", "bf16-mixed", "fp16-mixed")

__all__ = ["ADAPTER_PRECISIONS", "AdapterRecord", "adapters", "finish_restore", "init_data", "merged_state_dict", "prepare",
           "write_adapter_files"]


class AdapterRecord:
    """The part of every checkpoint's train_state that says what the adapters are and which base they
    apply to: kind, init, rank per layer, base hash and where the base came from."""

    def __init__(self, record: dict):
        self.record = record

    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state: dict) -> None:  # checked in prepare, before anything is loaded
        pass


def validate(mcfg, cfg: AdapterConfig, precision_mode: str, where: str = "adapter") -> None:
    """The one-line refusals prepare would raise, checked on a shape-only (meta) model before a run
    directory is written: precision mode, targets, a tied head, ranks."""
    if cfg.kind == "none":
        return
    _check_precision(precision_mode, cfg)
    from stagewise.model import Transformer

    with torch.device("meta"):
        model = Transformer(mcfg)
    names = _targets(model, cfg)
    check_ranks(model, names, {n: cfg.r for n in names})


def _check_precision(mode: str, cfg: AdapterConfig) -> None:
    if mode not in ADAPTER_PRECISIONS:
        raise ConfigError(f"precision.mode: {mode} cannot train adapters (it swaps or casts the frozen "
                          f"base weights); valid with adapter.kind {cfg.kind}: {', '.join(ADAPTER_PRECISIONS)}")


def _targets(model, cfg: AdapterConfig) -> list[str]:
    names = match_targets(model, cfg.target_modules)
    if model.cfg.tie_embeddings and "output" in names:
        raise ConfigError("adapter.target_modules: lm_head is tied to the embedding in this model "
                          "(model.tie_embeddings); an adapter on it would untie them, target the blocks' layers")
    return names


def _compute_dtype(precision) -> torch.dtype | None:
    """Frozen weights of adapted layers live in the compute dtype where autocast would round them to
    it at every matmul anyway (bf16-mixed): the same values, half the bytes."""
    return torch.bfloat16 if precision.name == "bf16-mixed" else None


def prepare(model, cfg: AdapterConfig, precision, base: str | None, saved: dict | None, data,
            seed: int = 0) -> AdapterRecord:
    """Attach and initialise adapters on `model` (its base weights loaded, precision set up).

    saved: the adapter record of the checkpoint being resumed (None: a fresh start); the layers are
    then rebuilt with its ranks and nothing is initialised: finish_restore settles the base after the
    checkpoint is loaded. data: (batches iterable factory, forward fn, loss fn) for eva / lora-ga."""
    _check_precision(precision.name, cfg)
    digest = state_hash(model)
    if saved is not None:
        if saved.get("base_hash") != digest:
            raise CheckpointError(f"the checkpoint's adapters were trained on base {saved.get('base_hash', '?')[:12]} "
                                  f"({saved.get('base')}), but that base now hashes to {digest[:12]}; "
                                  "resume needs the same base weights")
        attach(model, cfg, saved["ranks"])
        for name in saved.get("moved", []):
            model.get_submodule(name).declare_moved_base()
        model.adapter_record = saved
        return AdapterRecord(saved)
    names = _targets(model, cfg)
    ranks = {n: cfg.r for n in names}
    check_ranks(model, names, ranks)
    extra = {}
    if cfg.init in DATA_INITS:
        batches, objective = data

        def forward(m, batch):
            with precision.autocast():
                m(batch.inputs, **packing_kwargs(batch))

        def loss_fn(m, batch):
            with precision.autocast():
                out = objective(m, batch)
            return out.loss_sum / out.normaliser

        if cfg.init == "eva":
            ranks, extra = eva_ranks(collect_inputs(model, names, batches(), forward), cfg.r, cfg.eva_rho)
        else:
            extra = mean_gradients(model, names, batches(), loss_fn)
    adapted = attach(model, cfg, ranks)
    layers = adapters(model)
    for name in adapted:
        layer = layers[name]
        if cfg.init in ("pissa", "olora"):
            init_from_weights(layer, cfg.init)
        elif cfg.init == "eva":
            layer.set_factors(extra[name][:layer.r], torch.zeros_like(layer.lora_B), moves_base=False)
        elif cfg.init == "lora-ga":
            layer.set_factors(*lora_ga_factors(extra[name], layer.r), moves_base=True)
    settle(model, cfg, _compute_dtype(precision))
    for layer in layers.values():
        layer.init_magnitude()  # DoRA: m = ||base + s B A||, from the settled base
    moved = [n for n in adapted if layers[n].moves_base]
    record = {"kind": cfg.kind, "init": cfg.init, "alpha": cfg.alpha, "rslora": cfg.rslora, "dropout": cfg.dropout,
              "ranks": {n: r for n, r in ranks.items() if r > 0}, "moved": moved,
              "quant": [cfg.base_quant, cfg.quant_block, cfg.double_quant],
              "base_hash": digest, "base": None if base is None else str(Path(base).expanduser().resolve()),
              "seed": seed}
    model.adapter_record = record  # what export writes into adapter.json
    return AdapterRecord(record)


def finish_restore(model, cfg: AdapterConfig, precision) -> None:
    """After a resumed adapter checkpoint is loaded: the residual base from the loaded A0/B0, packed or cast."""
    settle(model, cfg, _compute_dtype(precision))


def init_data(stage, device):
    """What eva / lora-ga read, for prepare: a factory of the first init_batches batches the stage's
    source would give (the source is put back where it was, so the steps see the same data as without
    the init), and the stage's objective."""
    def batches():
        state = copy.deepcopy(stage.source.state_dict())
        try:
            for _ in range(stage.cfg.adapter.init_batches):
                yield stage.source.next().to(device)
        finally:
            stage.source.load_state_dict(state)
    return batches, stage.objective
