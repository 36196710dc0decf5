"""The optimizer a stage trains with (optim.name), with the usual LLM parameter grouping.

Weight decay applies to 2-D weight matrices of linear layers only; embeddings, norms and
biases are not decayed (decaying the embedding pulls rare tokens' vectors to zero, and
decaying norm gains fights the normalisation). With tied embeddings the shared matrix is
the embedding, so it is not decayed.

The memory-efficient optimizers (docs/memory.md) differ in what they keep per parameter:
  adamw                 fp32 exp_avg + exp_avg_sq                          8 bytes / parameter
  adamw-8bit / -4bit    block-wise quantized moments (optim/quantized.py)  ~2.06 / ~1.06
  galore(-8bit), fira   moments at the projected size plus the projector   (optim/projected.py)
  apollo, apollo-mini   moments at the projected size, the projector regenerated from a seed
  muon                  one fp32 momentum buffer on the covered matrices (optim/muon.py)
The low-rank kinds and muon cover the 2-D weights named by optim.targets; the rest (embeddings,
output head, norms) keep AdamW, in that optimizer's own rule.
"""

from __future__ import annotations

import torch

from stagewise.config.schema import OptimConfig
from stagewise.errors import ConfigError

PROJECTED = {"galore": "galore", "galore-8bit": "galore", "fira": "fira", "apollo": "apollo",
             "apollo-mini": "apollo"}


def param_groups(model: torch.nn.Module, weight_decay: float, lora_plus_ratio: float = 1.0,
                 targets: list[str] | None = None) -> list[dict]:
    """Trainable parameters only (an adapter run's frozen base has no optimizer state). With
    lora_plus_ratio != 1 the adapters' B matrices form a third group whose lr_scale is that ratio
    (LoRA+, Hayou et al. 2024); the step sets each group's lr to the schedule's lr * lr_scale.
    targets: the decayed matrices whose names contain one of these form a first group of their own
    (marked "covered"), the one a low-rank optimizer or Muon takes."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    covered, decay, no_decay, lora_b = [], [], [], []
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not p.requires_grad:
            continue
        if lora_plus_ratio != 1.0 and name.endswith(".lora_B"):
            lora_b.append(p)
            continue
        matrix = p.ndim >= 2 and id(p) not in embedding_ids
        if matrix and targets is not None and p.ndim == 2 and name != "output.weight" \
                and any(t in name for t in targets):
            covered.append(p)
        else:
            (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if targets is not None:
        groups.insert(0, {"params": covered, "weight_decay": weight_decay, "covered": True})
    if lora_b:
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr_scale": lora_plus_ratio})
    return groups


def projection_settings(cfg: OptimConfig, d_model: int) -> dict:
    """The covered group's settings for a low-rank kind (what ProjectedAdamW reads)."""
    kind = PROJECTED[cfg.name]
    mini = cfg.name == "apollo-mini"
    rank = 1 if mini else (cfg.rank or max(1, d_model // 4))
    scale = cfg.proj_scale if cfg.proj_scale is not None else (0.25 if kind in ("galore", "fira")
                                                               else 128.0 if mini else 1.0)
    return {"kind": kind, "rank": rank, "update_proj_gap": cfg.update_proj_gap, "scale": scale,
            "side": cfg.proj_side, "scale_type": cfg.scale_type or ("tensor" if mini else "channel"),
            "limiter": cfg.limiter}


def _adamw_kwargs(cfg: OptimConfig, device: torch.device) -> dict:
    impl = cfg.implementation
    if impl == "auto":
        # Fused AdamW has CPU and CUDA kernels since torch 2.4; it is one kernel per step
        # instead of one per parameter (for-loop) or per op (foreach).
        impl = "fused" if device.type in ("cpu", "cuda") else "foreach"
    if impl == "for-loop":
        return {"foreach": False}
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def check_optimizer(cfg: OptimConfig, where: str, precision_modes, adapter_kind: str) -> None:
    """One-line ConfigErrors for combinations the optimizers do not support."""
    if cfg.name == "adamw":
        return
    if "bf16-pure" in precision_modes:
        raise ConfigError(f"{where}.name: {cfg.name} needs fp32 weights to update; precision bf16-pure keeps bf16 "
                          "weights with its own compensated AdamW (valid there: adamw; or use bf16-mixed)")
    if adapter_kind != "none" and (cfg.name in PROJECTED or cfg.name == "muon"):
        raise ConfigError(f"{where}.name: {cfg.name} projects or orthogonalises full weight matrices, but adapter "
                          f"{adapter_kind} trains small low-rank factors (valid with adapters: adamw, adamw-8bit, "
                          "adamw-4bit)")
    if cfg.name == "apollo-mini" and cfg.rank not in (None, 1):
        raise ConfigError(f"{where}.rank: apollo-mini is rank 1, got {cfg.rank} (use apollo for another rank)")
    if (cfg.name in PROJECTED or cfg.name == "muon") and not cfg.targets:
        raise ConfigError(f"{where}.targets: {cfg.name} needs at least one parameter-name substring, got []")


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, device: torch.device,
                    lora_plus_ratio: float = 1.0, seed: int = 0) -> torch.optim.Optimizer:
    betas, name = (cfg.beta1, cfg.beta2), cfg.name
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay, lora_plus_ratio), lr=cfg.lr, betas=betas,
                                 eps=cfg.eps, **_adamw_kwargs(cfg, device))
    if name in ("adamw-8bit", "adamw-4bit"):
        from stagewise.optim.quantized import QuantizedAdamW

        return QuantizedAdamW(param_groups(model, cfg.weight_decay, lora_plus_ratio), lr=cfg.lr, betas=betas,
                              eps=cfg.eps, bits=8 if name == "adamw-8bit" else 4)
    groups = param_groups(model, cfg.weight_decay, lora_plus_ratio, targets=cfg.targets)
    if not groups[0]["params"]:
        raise ConfigError(f"optim.targets: no 2-D weight's name contains any of {cfg.targets} (parameter names "
                          "look like layers.0.attention.wq.weight, layers.0.feed_forward.w1.weight)")
    if name == "muon":
        from stagewise.optim.muon import MuonWithAdamW

        return MuonWithAdamW(groups[:1], groups[1:], lr=cfg.lr, betas=betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                             ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_lr_adjust.replace("-", "_"),
                             adamw_kwargs=_adamw_kwargs(cfg, device))
    from stagewise.optim.projected import ProjectedAdamW

    d_model = getattr(getattr(model, "cfg", None), "d_model", None) or min(groups[0]["params"][0].shape)
    groups[0].update(projection_settings(cfg, d_model))
    return ProjectedAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, bits=8 if name == "galore-8bit" else 32,
                          seed=seed)
