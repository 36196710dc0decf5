"""The model a stage trains, built and restored in one documented order.

Model transforms are applied from outside the model code, always in this order:

  1. precision swaps  (precision.setup: fp8/fake-quant linears, bf16-pure casts, fp16 emulation;
                       modules named in `keep` are left alone, as adapters will need)
  2. adapters         (the adapter issue)
  3. compile          (regional torch.compile of the blocks, when the precision allows it)
  4. sharding         (the distributed issue)

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
from stagewise.model import Transformer
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
    """What the step updates; switch_precision replaces all three together."""
    model: torch.nn.Module
    precision: object
    optimizer: torch.optim.Optimizer

    def optimizer_factory(self, stage: Stage, device):
        return lambda m: build_optimizer(stage.cfg.optim, m, device)


def build(stage: Stage, mcfg: ModelConfig, device: torch.device, checkpoint) -> tuple[Trainee, dict | None]:
    """The model with its precision and optimizer, before any checkpoint is loaded; returns it with the
    checkpoint's record (None when starting from scratch)."""
    cfg = stage.cfg
    seed_everything(cfg.seed)
    model = Transformer(mcfg).to(device)
    if checkpoint is None and cfg.init_from:
        rundir.load_weights(model, rundir.load_init_source(cfg.init_from)[1], f"init_from {cfg.init_from}")
    record = read_train_record(checkpoint) if checkpoint else None
    # A stage in another precision mode loads the previous stage's checkpoint in the mode it was saved
    # in and then switches, exactly as a precision schedule does (moments kept or reset).
    pcfg = cfg.precision
    if record is not None and stage.begins_at(record["train_state"]):
        pcfg = dataclasses.replace(pcfg, mode=record["train_state"]["precision"].get("mode") or pcfg.mode)
    precision = build_precision(pcfg, device, record["step"] if record else 0)
    model = precision.setup(model)                                                     # 1. precision swaps
    optimizer = precision.setup_optimizer(build_optimizer(cfg.optim, model, device))
    return Trainee(model, precision, optimizer), record


def restore(stage: Stage, trainee: Trainee, state: TrainState, checkpoint, record: dict, device) -> None:
    """Load `checkpoint` into trainee and state. At a boundary (the previous stage's final checkpoint)
    weights, counters, RNG and data positions carry over, optimizer moments only with
    optimizer_state: keep, and the stage's own hyperparameters replace the checkpoint's."""
    boundary = stage.begins_at(record["train_state"])
    optimizer = trainee.optimizer
    own_hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    saved = load_checkpoint(checkpoint, trainee.model, optimizer if not boundary or stage.keep_optimizer else None)
    parts = ["counters", "source", "precision"] + ([] if boundary else ["stage"])
    state.load_state_dict(saved, parts)
    if boundary:
        for group, hyper in zip(optimizer.param_groups, own_hyper):
            group.update(hyper)  # the new stage's betas, eps, weight decay, not the checkpoint's
        if stage.init_from:
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
