"""The memory plan: a training step's memory by component, predicted from the recipe alone.

The components are those the probe measures (memory/measure.py), in the same terms:

  weights      parameters at the precision's width, plus buffers (RoPE tables), from a model built
               on the meta device (exact shapes, no memory)
  gradients    one gradient per trainable parameter
  optimizer    the chosen optimizer's states, parameter by parameter, as optim/ stores them
               (optimizer_state_bytes)
  activations  what the forward leaves for the backward: the blocks' saved tensors under the
               checkpointing setting (model/flops.py estimate_memory, derived op by op) and the
               fused loss's stored head gradient
  loss_peak    the fused loss's working set (its stored gradients and chunk buffers)
  peak         the highest total of these during a step: weights + optimizer states + the larger of
               the end of the forward (activations + the loss's peak) and the backward (gradients
               plus what is still held: the loss's stored head gradient, the first block's
               activations, a checkpointed block's recompute)
  reference    a DPO/RL frozen copy (not in the tracked peak: it exists before the step)

`total` (the state, what plan has always printed) is weights + gradients + optimizer + activations
+ reference.
"""

from __future__ import annotations

import torch

from stagewise.optim.optimizer import PROJECTED, param_groups, projection_settings
from stagewise.optim.quantized import quantized_bytes


def emulates_bf16(mode: str, device: torch.device) -> bool:
    """Whether bf16 GEMMs run as fp32 ones here (precision/cpu_bf16.py): the loss's buffers are wider."""
    from stagewise.precision import MODES
    from stagewise.precision.cpu_bf16 import native_bf16_gemm

    return MODES[mode].compute_dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16_gemm()


def meta_model(mcfg):
    """The model training would build, on the meta device: shapes and names, no storage."""
    from stagewise.model import Transformer

    with torch.device("meta"):
        return Transformer(mcfg)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(model: torch.nn.Module, ocfg, d_model: int | None = None) -> int:
    """Bytes of optimizer state after the first step, tensor by tensor as optim/ allocates them."""
    name = ocfg.name
    if name == "adamw":  # exp_avg, exp_avg_sq and a float32 step tensor per parameter
        return sum(8 * p.numel() + 4 for g in param_groups(model, 0.0) for p in g["params"])
    if name in ("adamw-8bit", "adamw-4bit"):
        bits = 8 if name == "adamw-8bit" else 4
        return sum(2 * quantized_bytes(p.numel(), bits) + 4 for g in param_groups(model, 0.0) for p in g["params"])
    groups = param_groups(model, 0.0, targets=ocfg.targets)
    covered, rest = groups[0]["params"], [p for g in groups[1:] for p in g["params"]]
    if name == "muon":  # Muon: one momentum buffer; AdamW on the rest
        return sum(4 * p.numel() for p in covered) + sum(8 * p.numel() + 4 for p in rest)
    bits = 8 if name == "galore-8bit" else 32
    s = projection_settings(ocfg, d_model or getattr(model.cfg, "d_model", 0))
    total = sum(2 * quantized_bytes(p.numel(), bits) for p in rest)
    for p in covered:
        m, n = p.shape
        right = s["side"] == "right" or (s["side"] == "auto" and m >= n)
        r = min(s["rank"], m, n)
        low = m * r if right else r * n
        total += 2 * quantized_bytes(low, bits)
        if s["kind"] != "apollo":  # the SVD projector is stored; APOLLO regenerates its own from a seed
            total += 4 * (r * n if right else m * r)
        if s["kind"] in ("fira", "apollo") and s["limiter"]:
            total += 4  # the limiter's last norm
    return total


def predict(cfg, mcfg, emulated_bf16: bool = False) -> dict[str, int]:
    """Components (bytes) of one training step of `cfg` (a stage's RunConfig) on model config `mcfg`."""
    from stagewise.model.flops import estimate_memory
    from stagewise.precision import MODES

    prec = MODES[cfg.precision.mode]
    B, T = cfg.train.batch_size, cfg.data.seq_len
    a = prec.compute_dtype.itemsize
    est = estimate_memory(mcfg, B, T, param_bytes=prec.param_bytes + prec.master_bytes, grad_bytes=prec.grad_bytes,
                          act_bytes=a, fused_loss=prec.fused_loss, gemm_bytes=4 if emulated_bf16 else None,
                          checkpointing=cfg.train.activation_checkpointing, checkpoint_every=cfg.train.checkpoint_every)
    model = meta_model(mcfg)
    buffers = sum(_nbytes(b) for b in model.buffers())
    if cfg.precision.mode == "bf16-pure":
        n = sum(p.numel() for p in model.parameters())
        opt = n * (prec.optim_state_bytes + (2 if cfg.precision.kahan else 0))
    else:
        opt = optimizer_state_bytes(model, cfg.optim, mcfg.d_model)
    out = {"weights": est["params"] + buffers, "gradients": est["grads"], "optimizer": opt,
           "activations": est["activations"] + est["loss_stored"], "loss_peak": est["logits"]}
    stored = est["loss_stored"]
    if cfg.adapter.kind != "none":
        stored -= _adapter_components(out, cfg, mcfg, model, buffers)
    # The forward's high point: the blocks' activations, autocast's cached weight copies of checkpointed
    # blocks (kept until autocast exits, though no longer saved), and the loss's working set (with
    # gradient accumulation, beside the gradients); the backward's: all gradients and what is still
    # held (est["backward_held"]).
    forward = out["activations"] - stored + est["autocast_cache"] + out["loss_peak"]
    if cfg.train.grad_accum > 1:  # every forward after the first runs beside the accumulated gradients
        forward += out["gradients"]
    out["peak"] = out["weights"] + out["optimizer"] + max(forward, out["gradients"] + est["backward_held"])
    if cfg.spikes.action == "rollback":  # a copy of what a checkpoint holds, in host memory (train/spikes.py)
        weights = out["weights"]
        if cfg.adapter.kind != "none":
            from stagewise.adapters.sizes import adapter_sizes

            weights = adapter_sizes(mcfg, cfg.adapter, cfg.precision.mode)["adapter_bytes"] + buffers
        out["snapshot"] = weights + out["optimizer"]
    return out


def _adapter_components(out: dict, cfg, mcfg, model, buffers: int) -> int:
    """An adapter stage: the frozen (optionally packed) base, gradients and states for the adapters
    only; adapted layers hold their weight in the compute dtype (no autocast copy), and a frozen head
    takes no weight gradient in the loss (returned: the bytes the loss no longer stores)."""
    from stagewise.adapters.apply import match_targets
    from stagewise.adapters.sizes import adapter_sizes

    a = adapter_sizes(mcfg, cfg.adapter, cfg.precision.mode)
    shapes = []
    for name in match_targets(model, cfg.adapter.target_modules):
        lin = model.get_submodule(name)
        shapes += [cfg.adapter.r * lin.in_features, lin.out_features * cfg.adapter.r]
        if cfg.adapter.kind == "dora":
            shapes.append(lin.out_features)
    bits = {"adamw-8bit": 8, "adamw-4bit": 4}.get(cfg.optim.name, 32)
    out.update(weights=a["base_bytes"] + a["adapter_bytes"] + buffers, gradients=a["grad_bytes"],
               optimizer=sum(2 * quantized_bytes(n, bits) + 4 for n in shapes))
    if cfg.precision.mode == "bf16-mixed":
        out["activations"] -= 2 * a["adapted_base"]
    if a["head_adapted"]:
        return 0
    frozen_head = mcfg.vocab_size * mcfg.d_model * 4  # no fp32 weight gradient for the head
    out["activations"] -= frozen_head
    out["loss_peak"] -= frozen_head
    return frozen_head


def state_total(components: dict) -> int:
    return sum(components.get(k, 0) for k in ("weights", "gradients", "optimizer", "activations", "reference"))


__all__ = ["meta_model", "optimizer_state_bytes", "predict", "state_total", "PROJECTED"]
