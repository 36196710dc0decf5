"""AdamW with the usual LLM parameter grouping.

Weight decay applies to 2-D weight matrices of linear layers only; embeddings, norms and
biases are not decayed (decaying the embedding pulls rare tokens' vectors to zero, and
decaying norm gains fights the normalisation). With tied embeddings the shared matrix is
the embedding, so it is not decayed.
"""

from __future__ import annotations

import torch

from stagewise.config.schema import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has CPU and CUDA kernels since torch 2.4; it is one kernel per step
        # instead of one per parameter (for-loop) or per op (foreach).
        impl = "fused" if device.type in ("cpu", "cuda") else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    if impl == "for-loop":
        kwargs = {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
