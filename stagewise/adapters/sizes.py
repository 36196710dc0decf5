"""What adapters change in the parameter, FLOP and memory arithmetic (model/flops.py), for
`stagewise plan` and for the MFU an adapter run logs.

  trainable   per adapted layer r * (in + out), plus out for DoRA's magnitude (eva: the budget's
              r per layer, before redistribution; peft counts the same)
  FLOPs       a frozen matmul parameter costs 2 FLOPs per token forward and 2 backward (the input's
              gradient; no weight gradient), 4 in all; an adapter parameter 6, as in full training.
              So flops_per_token = 4 * N_matmul + 6 * N_adapter + the attention term.
  base bytes  an adapted layer's frozen weight: packed (QuantizedWeight's bytes: nf4 / int4 0.5 B
              + 4 B per block of quant_block, double quant 1 B + 4 B per 256 blocks instead), else
              2 B in bf16-mixed (stored in the compute dtype), else 4 B; every other frozen parameter
              (embedding, head, norms) 4 B
  optimizer   AdamW's two fp32 moments per trainable parameter (8 B), gradients 4 B
"""

from __future__ import annotations

import torch

from stagewise.config.schema import AdapterConfig, ModelConfig


def _base_bytes_per_param(cfg: AdapterConfig, mode: str) -> float:
    if cfg.base_quant == "none":
        return 2.0 if mode == "bf16-mixed" else 4.0
    payload = 1.0 if cfg.base_quant == "int8" else 0.5
    stats = (1 + 4 / 256) / cfg.quant_block if cfg.double_quant else 4 / cfg.quant_block
    return payload + stats


def adapter_sizes(mcfg: ModelConfig, cfg: AdapterConfig, mode: str) -> dict:
    """Counts and bytes of an adapter stage on `mcfg` (a shape-only model; nothing is allocated)."""
    from stagewise.adapters.apply import match_targets
    from stagewise.model import Transformer, param_counts

    with torch.device("meta"):
        model = Transformer(mcfg)
    names = match_targets(model, cfg.target_modules)
    matmul = magnitude = adapted_base = 0
    for name in names:
        lin = model.get_submodule(name)
        matmul += cfg.r * (lin.in_features + lin.out_features)
        magnitude += lin.out_features if cfg.kind == "dora" else 0
        adapted_base += lin.in_features * lin.out_features
    trainable = matmul + magnitude
    total = param_counts(mcfg)["total"]
    base_bytes = adapted_base * _base_bytes_per_param(cfg, mode) + (total - adapted_base) * 4
    return {"layers": len(names), "trainable": trainable, "frozen": total, "adapted_base": adapted_base,
            "base_bytes": int(base_bytes), "adapter_bytes": 4 * trainable, "grad_bytes": 4 * trainable,
            "optimizer_bytes": 8 * trainable, "head_adapted": "output" in names, "adapter_matmul": matmul}


def adapter_flops_per_token(mcfg: ModelConfig, cfg: AdapterConfig, seq_len: int) -> int:
    """Training FLOPs per token with the base frozen (module docstring)."""
    from stagewise.model import param_counts
    from stagewise.model.llama import resolved_dims

    adapter = adapter_sizes(mcfg, cfg, "fp32")["adapter_matmul"]
    _, hd, _ = resolved_dims(mcfg)
    return 4 * param_counts(mcfg)["matmul"] + 6 * adapter + 12 * mcfg.n_layers * mcfg.n_heads * hd * seq_len
