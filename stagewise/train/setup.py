"""The model a stage trains, built and restored in one documented order.

Model transforms are applied from outside the model code, always in this order:

  1. precision swaps  (precision.setup: fp8/fake-quant linears, bf16-pure casts, fp16 emulation;
                       modules named in `keep` are left alone, as adapters will need)
  2. adapters         (stagewise/adapters: LoRA / DoRA on the frozen, optionally packed base)
  3. checkpointing    (model/checkpointing.py: activation checkpointing of the blocks)
  4. compile          (regional torch.compile of the blocks, when the precision allows it; each
                       compiled block contains its checkpoint wrapper)
  5. sharding         (stagewise/distributed.py: fully_shard of every block and the root, or DDP beside
                       the model; before the optimizer is built over the sharded parameters. Compile
                       (4) is applied after the checkpoint is restored, to the sharded blocks, as
                       torchtitan orders them: regional compile inside, FSDP's hooks outside)

A stage starts from scratch, from `init_from`, from the previous stage's final checkpoint (a
boundary), or from its own checkpoint (a resume); all four go through `build` and `restore`.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

from stagewise import rundir
from stagewise.checkpoint import load_checkpoint
from stagewise.checkpoint.store import read_train_record
from stagewise.config.schema import ModelConfig, PrecisionStageConfig
from stagewise.errors import CheckpointError
from stagewise.model import Transformer
from stagewise.model.checkpointing import checkpoint_wrapper
from stagewise.optim import build_optimizer
from stagewise.precision import build_precision
from stagewise.precision.schedule import switch_precision
from stagewise.train.stage import Stage
from stagewise.train.state import TrainState


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Trainee:
    """What the step updates; switch_precision replaces all three together. adapter: the adapter
    record (adapters.AdapterRecord) of an adapter stage, else None."""
    model: torch.nn.Module
    precision: object
    optimizer: torch.optim.Optimizer
    adapter: object = None
    base_from_export: bool = False  # the weights came from the stage's base, not from the checkpoint
    call: object = None  # what the step's objective calls: the model, or its DDP wrapper (distributed.DDPModel)

    def optimizer_factory(self, stage: Stage, device):
        ratio = stage.cfg.adapter.lora_plus_ratio if self.adapter is not None else 1.0
        return lambda m: build_optimizer(stage.cfg.optim, m, device, lora_plus_ratio=ratio, seed=stage.cfg.seed)


def _load_base(model, source, what: str) -> None:
    if source is not None:
        rundir.load_weights(model, rundir.load_init_source(source)[1], f"{what} {source}")


def build(stage: Stage, mcfg: ModelConfig, device: torch.device, checkpoint, data=None) -> tuple[Trainee, dict | None]:
    """The model with its precision and optimizer, before any checkpoint is loaded; returns it with the
    checkpoint's record (None when starting from scratch). data: what adapter inits that read data
    use (adapters.prepare)."""
    cfg = stage.cfg
    seed_everything(cfg.seed)
    model = Transformer(mcfg).to(device)
    record = read_train_record(checkpoint) if checkpoint else None
    boundary = record is not None and stage.begins_at(record["train_state"])
    adapter_stage = cfg.adapter.kind != "none"
    # An adapter stage always starts from its base; so does any stage after an adapter stage, whose
    # final checkpoint holds only the adapters (the merged weights are that stage's export).
    from_export = adapter_stage or (boundary and record["train_state"].get("adapter") is not None)
    if from_export:
        _load_base(model, stage.base, "base")
    elif checkpoint is None and cfg.init_from:
        _load_base(model, cfg.init_from, "init_from")
    # A stage in another precision mode loads the previous stage's checkpoint in the mode it was saved
    # in and then switches, exactly as a precision schedule does (moments kept or reset).
    pcfg = cfg.precision
    if boundary and not from_export:
        pcfg = dataclasses.replace(pcfg, mode=record["train_state"]["precision"].get("mode") or pcfg.mode)
    precision = build_precision(pcfg, device, record["step"] if record else 0)
    model = precision.setup(model)                                                     # 1. precision swaps
    adapter = None
    if adapter_stage:                                                                  # 2. adapters
        from stagewise import adapters

        saved = record["train_state"].get("adapter") if record is not None and not boundary else None
        if record is not None and not boundary and saved is None:
            raise CheckpointError(f"{checkpoint}: holds a full model, not adapters; this stage trains adapters "
                                  f"(adapter.kind {cfg.adapter.kind})")
        adapter = adapters.prepare(model, cfg.adapter, precision, stage.base, saved, data, cfg.seed)
    model.checkpoint_blocks(checkpoint_wrapper(cfg.train.activation_checkpointing,                 # 3. checkpointing
                                               cfg.train.checkpoint_every))
    from stagewise.distributed import WORLD, parallelize

    call = parallelize(model, WORLD, precision.name)                                            # 5. sharding
    trainee = Trainee(model, precision, None, adapter, from_export, call)
    trainee.optimizer = precision.setup_optimizer(trainee.optimizer_factory(stage, device)(model))
    return trainee, record


def restore(stage: Stage, trainee: Trainee, state: TrainState, checkpoint, record: dict, device) -> None:
    """Load `checkpoint` into trainee and state. At a boundary (the previous stage's final checkpoint)
    weights, counters, RNG and data positions carry over, optimizer moments only with
    optimizer_state: keep, and the stage's own hyperparameters replace the checkpoint's."""
    boundary = stage.begins_at(record["train_state"])
    optimizer = trainee.optimizer
    own_hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if boundary and trainee.base_from_export:
        # Weights came from the stage's base; the trainable parameters differ from the checkpoint's,
        # so optimizer moments cannot carry over. Counters, data positions and RNG still do.
        saved = {**record["train_state"], "step": record["step"]}
    else:
        saved = load_checkpoint(checkpoint, trainee.model, optimizer if not boundary or stage.keep_optimizer else None)
    if trainee.adapter is not None and not boundary:
        from stagewise import adapters

        adapters.finish_restore(trainee.model, stage.cfg.adapter, trainee.precision)
    fresh_precision = boundary and trainee.base_from_export  # nothing of the old precision's state applies
    parts = ["counters", "source"] + ([] if fresh_precision else ["precision"]) + ([] if boundary else ["stage"])
    state.load_state_dict(saved, parts)
    # Parts a checkpoint holds only when written with them on (the spike guard's): the loss window is
    # the stage's own, the rollback log the run's.
    optional = ["rollbacks"] + ([] if boundary else ["spikes"])
    state.load_state_dict(saved, [n for n in optional if n in state.parts and n in saved])
    if boundary:
        for group, hyper in zip(optimizer.param_groups, own_hyper):
            group.update(hyper)  # the new stage's betas, eps, weight decay, not the checkpoint's
        if stage.init_from and not trainee.base_from_export:
            rundir.load_weights(trainee.model, rundir.load_init_source(stage.init_from)[1],
                                f"init_from {stage.init_from}")
        if trainee.precision.name != stage.cfg.precision.mode:
            step = state["counters"].step
            switch = PrecisionStageConfig(at_step=max(1, step), mode=stage.cfg.precision.mode,
                                          optimizer_state="keep" if stage.keep_optimizer else "reset")
            switched = switch_precision(stage.cfg.precision, switch, trainee.model, trainee.precision, optimizer,
                                        trainee.optimizer_factory(stage, device), device)
            trainee.model, trainee.precision, trainee.optimizer = switched
            state.register("precision", trainee.precision)
    state.load_state_dict(saved, ["rng"])
