"""Adapters as a model transform: which layers get one, how they start, and what a run records.

`attach` replaces each target nn.Linear by a LoRALinear (adapters/lora.py); `initialize` runs the
chosen init (data passes for eva / lora-ga, before step 1); `settle` turns the base into its final
frozen form (the residual of base-moving inits, packed or cast to the compute dtype). A resume runs
`attach` with the ranks its checkpoint recorded, loads the adapter state, then `settle`: the data
passes never run twice, and the residual comes from the same original base and the same A0/B0.

Initialisations, as peft defines them (peft/tuners/lora/layer.py, eva.py; LoRA-GA: Wang et al. 2024):
  pissa   W = V S U^T; A = diag(sqrt(S_r / s)) U_r^T, B = V_r diag(sqrt(S_r / s)); base W - s B A
  olora   W = Q R; A = R[:r], B = Q[:, :r]; base W - s B A
  eva     A = the top principal axes of the layer's inputs (tokens with a loss, over init_batches
          batches), B = 0; a budget of r ranks per layer is redistributed by explained variance,
          at most rho * r per layer (layers left with rank 0 get no adapter). Exact PCA of all the
          inputs at once, where peft runs an incremental low-rank PCA until the components stop
          changing: the same quantity up to peft's approximation (tests/test_adapters.py).
  lora-ga G = the mean gradient of W over init_batches batches; G ~ U S V^T by torch.svd_lowrank
          (q = min(4r, rank), 4 iterations); A = V[:, :r]^T, B = U[:, r:2r] diag(S[r:2r]) *
          out^(1/4) / sqrt(16) (peft's defaults: direction ArB2r, scale stable, gamma 16); base W - s B A
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Callable, Iterable

import torch
import torch.nn as nn

from stagewise.adapters.lora import LoRALinear
from stagewise.config.schema import AdapterConfig
from stagewise.errors import ConfigError

# stagewise module -> Hugging Face module, for the linear layers (interop/hf_families.py's table).
_LINEAR_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
              "feed_forward.w2": "mlp.down_proj"}
SHORT_NAMES = {hf.rsplit(".", 1)[1]: ours.rsplit(".", 1)[1] for ours, hf in _LINEAR_HF.items()} | {"lm_head": "output"}
BASE_MOVING = ("pissa", "olora", "lora-ga")
DATA_INITS = ("eva", "lora-ga")


def hf_module_name(name: str) -> str:
    """layers.3.attention.wq -> model.layers.3.self_attn.q_proj; output -> lm_head."""
    if name == "output":
        return "lm_head"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LINEAR_HF:
        raise KeyError(name)
    return f"model.layers.{m.group(1)}.{_LINEAR_HF[m.group(2)]}"


def stagewise_module_name(hf: str) -> str | None:
    """The inverse of hf_module_name; None for a module stagewise does not have."""
    if hf == "lm_head":
        return "output"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    inverse = {v: k for k, v in _LINEAR_HF.items()}
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}" if m and m.group(2) in inverse else None


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]


def match_targets(model: nn.Module, targets: list[str], where: str = "adapter.target_modules") -> list[str]:
    """The stagewise names of the linear layers `targets` selects, in model order; one line for a
    target that is unknown or matches nothing."""
    names = linear_names(model)
    chosen: set[str] = set()
    valid = "all-linear, " + ", ".join(SHORT_NAMES) + ", " + ", ".join(SHORT_NAMES.values()) + " or re:REGEX"
    for i, t in enumerate(targets):
        if t == "all-linear":
            hits = [n for n in names if n != "output"]
        elif isinstance(t, str) and t.startswith("re:"):
            try:
                rx = re.compile(t[3:])
            except re.error as e:
                raise ConfigError(f"{where}[{i}]: {t!r} is not a valid regular expression ({e})") from None
            hits = [n for n in names if rx.fullmatch(hf_module_name(n))]
        elif t in SHORT_NAMES or t in SHORT_NAMES.values():
            short = SHORT_NAMES.get(t, t)
            hits = [n for n in names if n.rsplit(".", 1)[-1] == short]
        else:
            raise ConfigError(f"{where}[{i}]: unknown module name {t!r}; valid: {valid}")
        if not hits:
            raise ConfigError(f"{where}[{i}]: {t!r} matches no linear layer of this model (its layers are "
                              f"named like {hf_module_name(names[0])} / {names[0]})")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def check_ranks(model: nn.Module, names: list[str], ranks: dict[str, int]) -> None:
    for name in names:
        lin = model.get_submodule(name)
        full = min(lin.in_features, lin.out_features)
        if ranks[name] > full:
            raise ConfigError(f"adapter.r: {ranks[name]} exceeds the rank of {hf_module_name(name)} "
                              f"({lin.out_features}x{lin.in_features}); valid: 1..{full}")


def attach(model: nn.Module, cfg: AdapterConfig, ranks: dict[str, int]) -> list[str]:
    """Replace each named linear by a LoRALinear of its rank (rank 0: left as it is); every other
    parameter is frozen. Returns the adapted names."""
    model.requires_grad_(False)
    adapted = []
    for name, r in ranks.items():
        if r <= 0:
            continue
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = LoRALinear(getattr(owner, child), r, cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                           dora=cfg.kind == "dora")
        if cfg.init == "gaussian":
            layer.reset_lora("gaussian")
        setattr(owner, child, layer)
        adapted.append(name)
    return adapted


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# -- initialisation ---------------------------------------------------------------------------------

@torch.no_grad()
@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every adapter of `model` switched off inside the block: the model computes its stage's starting
    point (the base, or the original W for base-moving inits), e.g. as the DPO reference."""
    layers = list(adapters(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def init_from_weights(layer: LoRALinear, init: str) -> None:
    """pissa / olora from the layer's own (unpacked) weight."""
    w = layer.base_weight(torch.float32)
    r, s = layer.r, layer.scaling
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A, B = root[:, None] * Uh[:r], V[:, :r] * root[None, :]
    else:  # olora
        Q, R = torch.linalg.qr(w)
        A, B = R[:r], Q[:, :r]
    layer.set_factors(A, B, moves_base=True)


def eva_ranks(inputs: dict[str, torch.Tensor], r: int, rho: float) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(rank per layer, principal axes per layer [k, in]) from each layer's input rows [N, in]:
    a budget of r per layer given out by explained-variance ratio, at most round(r * rho) each."""
    axes, ratios = {}, {}
    for name, x in inputs.items():
        x = x.float()
        x = x - x.mean(0, keepdim=True)
        _, S, Vh = torch.linalg.svd(x, full_matrices=False)
        k = min(round(r * rho), Vh.shape[0])
        var = S ** 2
        axes[name], ratios[name] = Vh[:k], var[:k] / var.sum().clamp_min(1e-30)
    keys = [n for n in inputs for _ in range(len(ratios[n]))]
    order = torch.cat([ratios[n] for n in inputs]).argsort(descending=True, stable=True)
    counts = dict.fromkeys(inputs, 0)
    for i in order[: r * len(inputs)].tolist():
        counts[keys[i]] += 1
    return counts, axes


def lora_ga_factors(grad: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of LoRA-GA from a weight's mean gradient, peft's defaults (module docstring)."""
    g = grad.float()
    U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
    A = V.t()[:r]
    B = U[:, r:2 * r] @ torch.diag(S[r:2 * r])
    return A, B * (g.shape[0] ** 0.25 / 16 ** 0.5)


def collect_inputs(model: nn.Module, names: list[str], batches: Iterable, forward: Callable) -> dict[str, torch.Tensor]:
    """Each named layer's input rows at the tokens that take a loss, over all batches."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    keep = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach()
            rows[name].append(x.reshape(-1, x.shape[-1])[keep["mask"]].float().cpu())
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            keep["mask"] = (batch.targets != -100).reshape(-1).to(next(model.parameters()).device)
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def mean_gradients(model: nn.Module, names: list[str], batches: Iterable, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """The mean over batches of d loss / d W for each named layer's weight (only those require grad)."""
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    n = 0
    try:
        for batch in batches:
            with torch.enable_grad():
                loss_fn(model, batch).backward()
            n += 1
        return {name: w.grad.detach() / n for name, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for p, f in flags.items():
            p.requires_grad_(f)


# -- the base -----------------------------------------------------------------------------------

def state_hash(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state (the base an adapter
    applies to), in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of a 670 MB embedding
    return h.hexdigest()


def settle(model: nn.Module, cfg: AdapterConfig, compute_dtype: torch.dtype | None) -> None:
    """The adapted layers' frozen weights in their final form: the residual of a base-moving init,
    then packed (base_quant) or stored in the compute dtype. A weight shared with the embedding (an
    imported adapter on a tied head) is left as it is."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for layer in adapters(model).values():
        if layer.moves_base:
            layer.settle_base()
        if id(layer.weight) in shared:  # a tied head is the embedding: left as it is
            continue
        if cfg.base_quant != "none":
            layer.pack_base(cfg.base_quant, cfg.quant_block, cfg.double_quant)
        elif compute_dtype is not None:
            layer.cast_base(compute_dtype)


def merged_state_dict(model: nn.Module, originals: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state with every adapter merged into its layer's weight (fp32; a packed base
    dequantized), under the plain model's names: what export writes. originals: layer name -> the
    base weight before it was stored in the compute dtype (cast_base), merged into instead."""
    out = {}
    originals = originals or {}
    layers = adapters(model)
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in layers and name.rpartition(".")[2].startswith("lora_"):
            continue
        out[name] = t
    for name, layer in layers.items():
        out[f"{name}.weight"] = layer.merged_weight(originals.get(name))
    return out


def original_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 base weights of the layers whose frozen weight was cast to the compute dtype, read
    again from the base the adapter record names (None there: its seeded initialisation)."""
    layers = {n: layer for n, layer in adapters(model).items() if getattr(layer, "base_cast", False)}
    if not layers:
        return {}
    from stagewise.adapters.rebuild import _base_model

    base = _base_model(model.adapter_record, model.cfg, "export")
    return {n: base.get_submodule(n).weight.detach() for n in layers}
