"""AdamW with the usual LLM parameter grouping.

Weight decay applies to 2-D weight matrices of linear layers only; embeddings, norms and
biases are not decayed (decaying the embedding pulls rare tokens' vectors to zero, and
decaying norm gains fights the normalisation). With tied embeddings the shared matrix is
the embedding, so it is not decayed.
"""

from __future__ import annotations

import torch

from stagewise.config.schema import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float, lora_plus_ratio: float = 1.0) -> list[dict]:
    """Trainable parameters only (an adapter run's frozen base has no optimizer state). With
    lora_plus_ratio != 1 the adapters' B matrices form a third group whose lr_scale is that ratio
    (LoRA+, Hayou et al. 2024); the step sets each group's lr to the schedule's lr * lr_scale."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, lora_b = [], [], []
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        if lora_plus_ratio != 1.0 and name.endswith(".lora_B"):
            lora_b.append(p)
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if lora_b:
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr_scale": lora_plus_ratio})
    return groups


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, device: torch.device,
                    lora_plus_ratio: float = 1.0) -> torch.optim.Optimizer:
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has CPU and CUDA kernels since torch 2.4; it is one kernel per step
        # instead of one per parameter (for-loop) or per op (foreach).
        impl = "fused" if device.type in ("cpu", "cuda") else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    if impl == "for-loop":
        kwargs = {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, lora_plus_ratio), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
