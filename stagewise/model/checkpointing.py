"""Activation checkpointing of transformer blocks, applied from outside the model.

A checkpointed block keeps only its input for the backward and runs its forward again there
(torch.utils.checkpoint, non-reentrant), trading about one more forward of that block per step
for its saved activations. Three settings (train.activation_checkpointing):

  full       every checkpointed block saves nothing but its input;
  selective  the block saves the outputs of its matmuls (the q/k/v/o and MLP projections and the
             attention kernel) and recomputes only the cheap elementwise work — norms, RoPE, the
             SwiGLU product — so the backward replays no GEMM (Korthikanti et al. 2022 apply the same
             trade to attention; this is torchtitan's op-level "selective" policy);
  none       nothing recomputed.

`every` = k checkpoints blocks 0, k, 2k, ...; the others keep all their activations.
The wrapper is a module that is not a submodule (parameter names and checkpoints unchanged), so
activation hooks attach outside the checkpointed region and fire once per forward. Under no_grad
(evaluation, generation) a block runs plainly: there is no backward to save for.

Recomputation replays the same ops on the same inputs with the RNG state restored, so gradients
are bitwise those of the plain forward (tests/test_memory.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# The ops whose outputs a selective block saves: every GEMM and the attention kernels CPU and CUDA use.
MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
              _aten._scaled_dot_product_flash_attention.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default,
              _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default,
              _aten._scaled_mm.default}


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in MATMUL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedBlock(nn.Module):
    def __init__(self, block: nn.Module, selective: bool):
        super().__init__()
        self.__dict__["block"] = block  # not registered: the block stays layers.{i} in the state dict
        self.selective = selective

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.block(*args)
        kwargs = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)} \
            if self.selective else {}
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_wrapper(mode: str, every: int):
    """(block index, block) -> what the model runs for that block, for Transformer.checkpoint_blocks;
    None for mode none."""
    if mode == "none":
        return None

    def wrap(i: int, block: nn.Module) -> nn.Module:
        return CheckpointedBlock(block, mode == "selective") if i % every == 0 else block
    return wrap
