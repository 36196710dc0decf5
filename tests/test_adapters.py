"""Adapters against the independent reference: peft applied to transformers' LlamaForCausalLM with the
same weights (logits, adapter gradients, inits), plus the invariants of base-moving inits."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.eva import get_eva_state_dict

from stagewise.adapters.apply import adapters, attach, eva_ranks, hf_module_name, lora_ga_factors, match_targets
from stagewise.adapters.peft_format import apply_adapter, from_peft, to_peft
from stagewise.config.schema import AdapterConfig
from stagewise.errors import ConfigError
from stagewise.interop.hf_families import FAMILIES, to_hf_state_dict
from stagewise.model.llama import Transformer
from test_hf_parity import BASE, explicit, hf_model  # noqa: F401  (a tiny Llama and its HF twin)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def twins(tied=False, lm_head=False):
    """(our model, the HF model with the same weights)."""
    cfg = explicit(BASE.__class__(**{**BASE.__dict__, "n_kv_heads": 2, "tie_embeddings": tied}))
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = hf_model(cfg)
    sd = ours.state_dict()
    hf.load_state_dict(to_hf_state_dict(sd, FAMILIES["llama"], tied), strict=not tied)
    return ours, hf


def randomise(ours, peft_model):
    """Non-zero adapters (B starts at 0), the same in both."""
    g = torch.Generator().manual_seed(3)
    for name, layer in adapters(ours).items():
        hf = peft_model.base_model.model.get_submodule(hf_module_name(name))
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
            hf.lora_A["default"].weight.copy_(layer.lora_A)
            hf.lora_B["default"].weight.copy_(layer.lora_B)
            if layer.dora:
                layer.lora_magnitude.mul_(1.0 + 0.1 * torch.rand(layer.lora_magnitude.shape, generator=g))
                hf.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)


def peft_twin(hf, **kw):
    kw.setdefault("target_modules", ALL)
    return get_peft_model(hf, LoraConfig(lora_dropout=0.0, **kw))


def our_cfg(kind="lora", **kw):
    return AdapterConfig(kind=kind, **kw)


def attach_all(ours, cfg, targets=("all-linear",)):
    names = match_targets(ours, list(targets))
    attach(ours, cfg, {n: cfg.r for n in names})


TOKENS = torch.randint(0, BASE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def logits_and_grads(ours, pm):
    a = ours(TOKENS)
    b = pm(input_ids=TOKENS).logits
    a.float().pow(2).mean().backward()
    b.float().pow(2).mean().backward()
    return a, b


@pytest.mark.parametrize("kind,rslora,lm_head", [("lora", False, False), ("lora", True, False), ("dora", False, False),
                                                 ("lora", False, True), ("dora", True, True)])
def test_forward_and_adapter_gradients_match_peft(kind, rslora, lm_head):
    ours, hf = twins()
    targets = ALL + (["lm_head"] if lm_head else [])
    cfg = our_cfg(kind, r=4, alpha=8, rslora=rslora)
    attach_all(ours, cfg, targets)
    pm = peft_twin(hf, r=4, lora_alpha=8, use_rslora=rslora, use_dora=kind == "dora", target_modules=targets)
    randomise(ours, pm)
    a, b = logits_and_grads(ours, pm)
    assert (a - b).abs().max() < 1e-4
    for name, layer in adapters(ours).items():
        ref = pm.base_model.model.get_submodule(hf_module_name(name))
        for ours_p, ref_p in ((layer.lora_A, ref.lora_A["default"].weight), (layer.lora_B, ref.lora_B["default"].weight)):
            # atol 1e-5: fp32 GEMM reduction order differs between CPU kernels (1.65e-6 seen on a Xeon with AMX,
            # gradients ~0.1-0.3); far below any real mismatch of an adapter's gradient
            assert torch.allclose(ours_p.grad, ref_p.grad, rtol=1e-4, atol=1e-5), (name, (ours_p.grad - ref_p.grad).abs().max())
        if layer.dora:
            assert torch.allclose(layer.lora_magnitude.grad, ref.lora_magnitude_vector["default"].weight.grad,
                                  rtol=1e-4, atol=1e-6)
    # only adapter parameters are trainable
    assert {n.rsplit(".", 1)[1] for n, p in ours.named_parameters() if p.requires_grad} <= {"lora_A", "lora_B",
                                                                                             "lora_magnitude"}


def test_fused_loss_with_an_adapted_head_matches_unfused():
    ours, _ = twins()
    attach_all(ours, our_cfg(r=4, alpha=8), ["all-linear", "lm_head"])
    for layer in adapters(ours).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    targets = torch.roll(TOKENS, -1, 1)
    fused = ours(TOKENS, targets=targets)
    fused.backward()
    g_fused = adapters(ours)["output"].lora_B.grad.clone()
    ours.zero_grad()
    ours.fused_loss = False
    plain = ours(TOKENS, targets=targets)
    plain.backward()
    assert torch.allclose(fused, plain, rtol=1e-5)
    assert torch.allclose(g_fused, adapters(ours)["output"].lora_B.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_moving_inits_match_peft_and_keep_the_weight(init):
    ours, hf = twins()
    cfg = our_cfg(r=4, alpha=8, init=init)
    attach_all(ours, cfg)
    from stagewise.adapters.apply import init_from_weights, settle

    originals = {n: layer.weight.detach().clone() for n, layer in adapters(ours).items()}
    for layer in adapters(ours).values():
        init_from_weights(layer, init)
    settle(ours, cfg, None)
    pm = peft_twin(hf, r=4, lora_alpha=8, init_lora_weights=init)
    for name, layer in adapters(ours).items():
        ref = pm.base_model.model.get_submodule(hf_module_name(name))
        # residual + s * B A is the original weight at step 0
        assert torch.allclose(layer.merged_weight(), originals[name], atol=1e-5)
        assert torch.allclose(layer.weight, ref.base_layer.weight, atol=1e-5)
        # the factors are peft's up to the SVD's sign per component (B_i A_i is sign-free)
        ours_ba = layer.lora_B[:, :, None] * layer.lora_A[None]
        ref_ba = ref.lora_B["default"].weight[:, :, None] * ref.lora_A["default"].weight[None]
        assert torch.allclose(ours_ba, ref_ba, atol=1e-5)
    with torch.no_grad():
        assert (ours(TOKENS) - pm(input_ids=TOKENS).logits).abs().max() < 1e-4


def test_lora_ga_factors_match_peft_given_the_same_gradient_and_seed():
    from peft import LoraGAConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=False)
    grad = torch.randn(40, 48)
    layer = PeftLinear(base, "default", r=4, lora_alpha=8, init_lora_weights=False,
                       config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()))
    base._peft_loraga_grad = grad
    torch.manual_seed(11)
    layer.lora_ga_init("default", LoraGAConfig())
    torch.manual_seed(11)
    A, B = lora_ga_factors(grad, 4)
    assert torch.allclose(A, layer.lora_A["default"].weight, atol=1e-6)
    assert torch.allclose(B, layer.lora_B["default"].weight, atol=1e-6)


def test_eva_matches_peft_on_one_batch():
    """peft's EVA runs an incremental low-rank PCA (torch.svd_lowrank, seed 42) over batches until the
    components stop moving; stagewise takes the exact PCA of all inputs at once. On one batch the
    two estimate the same principal axes: the top axes agree up to sign, and the rank redistribution
    (by explained-variance ratio) is the same."""
    ours, hf = twins()
    targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
    names = match_targets(ours, targets)
    inputs = {}
    hooks = [ours.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).detach())) for n in names]
    tokens = torch.randint(0, BASE.vocab_size, (8, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours(tokens)
    for h in hooks:
        h.remove()
    ranks, axes = eva_ranks(inputs, r=4, rho=2.0)
    from peft import EvaConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2.0, use_label_mask=False, tau=0.999))
    ref = get_eva_state_dict(hf, [{"input_ids": tokens}], config, show_progress_bar=False)
    assert sum(ranks.values()) == 4 * len(names)
    for name in names:
        key = next(k for k in ref if k.endswith(hf_module_name(name)))
        assert ranks[name] == ref[key].shape[0], name
        k = min(2, ranks[name])
        cos = torch.nn.functional.cosine_similarity(axes[name][:k], ref[key][:k], dim=1).abs()
        assert (cos > 0.99).all(), (name, cos)


def test_peft_round_trip_of_a_stagewise_adapter():
    ours, hf = twins()
    cfg = our_cfg("dora", r=4, alpha=8)
    attach_all(ours, cfg, ["q_proj", "v_proj", "down_proj"])
    pm = peft_twin(hf, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    randomise(ours, pm)
    tensors = {f"{n}.{k}": t for n, layer in adapters(ours).items() for k, t in layer.state_dict().items()
               if k.startswith("lora_")}
    meta = {"kind": "dora", "alpha": 8.0, "rslora": False, "dropout": 0.0, "ranks": {n: 4 for n in adapters(ours)},
            "moved": [], "n_layers": 2}
    config, peft_tensors = to_peft(meta, tensors, "base")
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    ref_sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            for k in ref_sd} == set(peft_tensors)
    meta2, tensors2 = from_peft(config, peft_tensors)
    fresh, _ = twins()
    apply_adapter(fresh, meta2, tensors2, "round trip")
    with torch.no_grad():
        assert (fresh(TOKENS) - ours(TOKENS)).abs().max() < 1e-6


def test_bad_targets_and_ranks_are_one_line_errors():
    ours, _ = twins()
    with pytest.raises(ConfigError, match="matches no linear layer"):
        match_targets(ours, ["re:model\\.layers\\.9\\..*"])
    with pytest.raises(ConfigError, match="unknown module name 'qproj'"):
        match_targets(ours, ["qproj"])
    from stagewise.adapters.apply import check_ranks

    names = match_targets(ours, ["k_proj"])
    with pytest.raises(ConfigError, match=r"adapter.r: 64 exceeds the rank of model.layers.0.self_attn.k_proj "
                                          r"\(32x64\); valid: 1..32"):
        check_ranks(ours, names, {n: 64 for n in names})
    with pytest.raises(ConfigError, match="peft_type 'IA3' is not supported"):
        from stagewise.adapters.peft_format import read_peft
        import json
        import tempfile
        from pathlib import Path

        d = Path(tempfile.mkdtemp())
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        read_peft(d)


def test_plan_counts_and_flops_on_a_hand_computed_case():
    """BASE: d 64, 4 heads of 16 (2 kv), ffn 160, 2 layers, vocab 101 untied. r 4 on all-linear:
    per layer q 4(64+64), k and v 4(64+32), o 4(64+64), gate/up/down 4(64+160) = 4480."""
    from stagewise.adapters.sizes import adapter_flops_per_token, adapter_sizes
    from dataclasses import replace

    cfg = replace(explicit(BASE), n_kv_heads=2, tie_embeddings=False)
    sizes = adapter_sizes(cfg, our_cfg(r=4), "fp32")
    assert sizes["trainable"] == 2 * 4480 and sizes["layers"] == 14
    matmul = 2 * (64 * 16 * 12 + 3 * 64 * 160) + 101 * 64
    assert adapter_flops_per_token(cfg, our_cfg(r=4), 32) == 4 * matmul + 6 * 8960 + 12 * 2 * 4 * 16 * 32
    dora = adapter_sizes(cfg, our_cfg("dora", r=4), "fp32")
    assert dora["trainable"] == 2 * (4480 + 64 + 32 + 32 + 64 + 160 + 160 + 64)
    # a packed base: the bytes plan predicts are the bytes the packed layers hold
    nf4 = adapter_sizes(cfg, our_cfg(r=4, base_quant="nf4"), "fp32")
    ours = Transformer(cfg)
    attach_all(ours, our_cfg(r=4))
    from stagewise.adapters.apply import settle

    settle(ours, our_cfg(r=4, base_quant="nf4"), None)
    packed = sum(layer.packed.nbytes() for layer in adapters(ours).values())
    unpacked = 4 * sum(p.numel() for n, p in ours.named_parameters() if ".lora_" not in n)
    assert nf4["base_bytes"] == packed + unpacked


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_base_moving_adapter_exports_as_a_plain_lora_on_the_original_base(init, rslora, tmp_path):
    """After training, W_res + s B A = W + s (B A - B0 A0): peft's rank-2r LoRA on the original W."""
    from peft import PeftModel
    from safetensors.torch import save_file
    import json

    from stagewise.adapters.apply import init_from_weights, settle

    ours, hf = twins()
    cfg = our_cfg(r=4, alpha=8, init=init, rslora=rslora)
    attach_all(ours, cfg, ["q_proj", "down_proj"])
    for layer in adapters(ours).values():
        init_from_weights(layer, init)
    settle(ours, cfg, None)
    with torch.no_grad():  # "training" moved the factors away from A0, B0
        for layer in adapters(ours).values():
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    tensors = {f"{n}.{k}": t for n, layer in adapters(ours).items() for k, t in layer.state_dict().items()
               if k.startswith("lora_")}
    meta = {"kind": "lora", "alpha": 8.0, "rslora": rslora, "dropout": 0.0, "ranks": {n: 4 for n in adapters(ours)},
            "moved": list(adapters(ours)), "n_layers": 2}
    config, peft_tensors = to_peft(meta, tensors, "base")
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    save_file(peft_tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, tmp_path).eval()(input_ids=TOKENS).logits
        assert (theirs - ours(TOKENS)).abs().max() < 1e-4
