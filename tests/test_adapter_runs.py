"""Adapter runs end to end through the CLI: trainable-only checkpoints, bitwise resume after SIGKILL,
the base check, export-peft -> peft.PeftModel parity, import-peft, export-hf --merge, continual
stages and the one-line refusals."""

import json
import signal
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe
from stagewise import rundir

pytestmark = pytest.mark.slow

TOKENS = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_dir, data_cache):
    """A 20-step tiny pre-trained model, its Hugging Face export, and a recipe fine-tuning it."""
    d = tmp_path_factory.mktemp("adapters")
    recipe = tiny_recipe(d / "base.yaml", corpus_dir, data_cache, d / "runs")
    tied = "n_kv_heads: 2, max_seq_len: 128}"
    recipe.write_text(recipe.read_text().replace(tied, tied[:-1] + ", tie_embeddings: false}"))
    run_cli("run", recipe, "--name=base")  # untied, so that the output head can take an adapter
    run_cli("export-hf", d / "runs" / "base", d / "hf_base")
    text = recipe.read_text().replace("name: tiny", f"name: lora\ninit_from: {d / 'runs' / 'base' / 'final'}")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("model:")) + "\n"
    (d / "lora.yaml").write_text(text + "adapter: {kind: lora, r: 4, alpha: 8}\n")
    return d


def adapter_run(base, name, *overrides, env=None, check=True):
    return run_cli("run", base / "lora.yaml", f"--name={name}", *overrides, env=env, check=check)


def final_adapter(run: Path) -> dict:
    return load_file(run / "final" / "adapter.safetensors")


def peft_logits(base, adapter_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "hf_base", dtype=torch.float32).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(hf, adapter_dir).eval()(input_ids=TOKENS).logits


def our_logits(path):
    with torch.no_grad():
        return rundir.load_model(path, torch.device("cpu"))[0](TOKENS)


VARIANTS = {
    "lora": [],
    "dora-pissa-nf4": ["--adapter.kind=dora", "--adapter.init=pissa", "--adapter.base_quant=nf4",
                       "--adapter.double_quant=true", "--adapter.lora_plus_ratio=4"],
    "eva": ["--adapter.init=eva", "--adapter.init_batches=2"],
    "lora-ga-rslora": ["--adapter.init=lora-ga", "--adapter.init_batches=2", "--adapter.rslora=true",
                       "--adapter.target_modules=[q_proj,v_proj,lm_head]"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sigkill_resume_is_bitwise_and_checkpoints_hold_only_adapters(base, variant):
    args = VARIANTS[variant]
    adapter_run(base, f"{variant}-full", *args)
    proc = adapter_run(base, f"{variant}-killed", *args, env={"STAGEWISE_DEBUG_KILL_AT_STEP": "13"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", base / "runs" / f"{variant}-killed")
    full, resumed = final_adapter(base / "runs" / f"{variant}-full"), final_adapter(base / "runs" / f"{variant}-killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    ckpt = rundir.resolve_model_source(base / "runs" / f"{variant}-full")[1]
    record = json.loads((ckpt / "train_state.json").read_text())
    assert record["trainable_only"]
    model_keys = [k for k in record["tensor_keys"] if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:3]
    # the exported adapter loads into peft on the HF base with the logits stagewise computes
    out = base / f"peft-{variant}"
    run_cli("export-peft", base / "runs" / f"{variant}-full", out)
    diff = (peft_logits(base, out) - our_logits(base / "runs" / f"{variant}-full" / "final")).abs().max()
    assert diff < (1e-4 if "nf4" not in variant else 0.2), diff  # peft applies it to the unpacked base


def test_merge_into_packed_base_reports_and_matches(base):
    run = base / "runs" / "dora-pissa-nf4-full"
    if not run.is_dir():
        adapter_run(base, "dora-pissa-nf4-full", *VARIANTS["dora-pissa-nf4"])
    no_merge = run_cli("export-hf", run, base / "merged-refused", check=False)
    assert no_merge.returncode == 2 and "pass --merge" in no_merge.stderr
    assert not (base / "merged-refused").exists()
    proc = run_cli("export-hf", run, base / "merged", "--merge")
    assert "dequantized 14 packed (nf4) base weights into float32" in proc.stdout + proc.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        merged = hf(input_ids=TOKENS).logits
    trained = our_logits(run)  # the latest checkpoint: base, packed as trained, plus the adapters
    assert (merged - trained).abs().max() < 1e-4


def test_resume_refuses_a_different_base(base, tmp_path):
    proc = adapter_run(base, "moved-base", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "7"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    weights = base / "runs" / "base" / "final" / "model.safetensors"
    saved = weights.read_bytes()
    try:
        sd = load_file(weights)
        sd["norm.weight"] = sd["norm.weight"] + 1.0
        from safetensors.torch import save_file

        save_file(sd, weights, metadata={"format": "pt"})
        proc = run_cli("resume", base / "runs" / "moved-base", check=False)
    finally:
        weights.write_bytes(saved)
    assert proc.returncode == 2
    assert "resume needs the same base weights" in proc.stderr and proc.stderr.count("\n") == 1


def test_import_of_a_peft_made_adapter(base):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "hf_base", dtype=torch.float32)
    torch.manual_seed(4)
    pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                                       rank_pattern={"model.layers.1.mlp.up_proj": 2}, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(base / "peft-made")
    with torch.no_grad():
        ref = pm.eval()(input_ids=TOKENS).logits
    run_cli("import-peft", base / "peft-made", base / "hf_base", base / "imported")
    assert (our_logits(base / "imported") - ref).abs().max() < 1e-4
    # init_from may name the PEFT directory itself: its (local) base with the adapter merged
    mcfg, state, _, _ = rundir.load_init_source(base / "peft-made")
    from stagewise.model import Transformer

    model = Transformer(mcfg).eval()
    rundir.load_weights(model, state, "test")
    with torch.no_grad():
        assert (model(TOKENS) - ref).abs().max() < 1e-4
    # and back out: the same adapter tensors
    run_cli("export-peft", base / "imported", base / "re-exported")
    again = load_file(base / "re-exported" / "adapter_model.safetensors")
    for k, v in load_file(base / "peft-made" / "adapter_model.safetensors").items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("override,message", [
    (["--adapter.target_modules=[re:model\\.layers\\.7\\..*]"], "matches no linear layer of this model"),
    (["--adapter.r=0"], "adapter.r: expected an integer > 0, got 0"),
    (["--adapter.r=100"], "exceeds the rank of model.layers.0.self_attn.q_proj"),
    (["--precision.mode=fp8"], "precision.mode: fp8 cannot train adapters"),
])
def test_bad_adapter_configs_fail_in_one_line_and_write_nothing(base, override, message):
    proc = adapter_run(base, "bad", *override, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (base / "runs" / "bad").exists()


def test_import_peft_refusals(base, tmp_path):
    bad = tmp_path / "ia3"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    proc = run_cli("import-peft", bad, base / "hf_base", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "peft_type 'IA3' is not supported; valid: LORA" in proc.stderr
    # an adapter for a model with more layers than the base
    run = base / "peft-lora"
    if not run.is_dir():  # made by the resume test of the lora variant; alone, make it here
        adapter_run(base, "lora-full")
        run_cli("export-peft", base / "runs" / "lora-full", run)
    cfg = json.loads((run / "adapter_config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(run / "adapter_model.safetensors")
    sd = {k.replace("layers.1.", "layers.5."): v for k, v in sd.items()}
    from safetensors.torch import save_file

    save_file(sd, other / "adapter_model.safetensors")
    proc = run_cli("import-peft", other, base / "hf_base", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "the adapter is for a different base" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_adapter_stage_then_a_full_stage(base, corpus_dir):
    """Continual: stage 0 trains adapters on the base, stage 1 trains every weight of the merged model;
    a kill inside stage 1 resumes from its own (full) checkpoint."""
    text = (base / "lora.yaml").read_text().replace("train: {steps: 20, batch_size: 8}", "train: {batch_size: 8}")
    text = text.replace("data:\n  sources: [{kind: text, path: " + str(corpus_dir) + "}]\n", "data:\n")
    stages = f"""stages:
  - name: adapt
    steps: 10
    init_from: {base / 'runs' / 'base' / 'final'}
    adapter: {{kind: lora, r: 4, alpha: 8}}
    mixture: [{{name: code, source: {{kind: text, path: {corpus_dir}}}}}]
  - name: full
    steps: 10
    mixture: [{{name: code, source: {{kind: text, path: {corpus_dir}}}}}]
"""
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("init_from:", "adapter:")))
    (base / "staged.yaml").write_text(text + "\n" + stages)
    proc = run_cli("run", base / "staged.yaml", "--name=staged", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "16"},
                   check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_cli("resume", base / "runs" / "staged")
    run = base / "runs" / "staged"
    assert (run / "stages" / "adapt" / "adapter.json").is_file()
    assert not (run / "stages" / "full" / "adapter.json").exists()
    last = json.loads((rundir.resolve_model_source(run)[1] / "train_state.json").read_text())
    assert not last["trainable_only"] and "adapter" not in last["train_state"]
    adapted = load_file(run / "stages" / "adapt" / "model.safetensors")
    full = load_file(run / "stages" / "full" / "model.safetensors")
    base_w = load_file(base / "runs" / "base" / "final" / "model.safetensors")
    # stage 0 changed only the adapted linears (merged); stage 1 changed the embedding too
    assert torch.equal(adapted["tok_embeddings.weight"], base_w["tok_embeddings.weight"])
    assert not torch.equal(adapted["layers.0.attention.wq.weight"], base_w["layers.0.attention.wq.weight"])
    assert not torch.equal(full["tok_embeddings.weight"], adapted["tok_embeddings.weight"])


@pytest.mark.parametrize("mode,compile_", [("bf16-mixed", True), ("fp16-mixed", False)])
def test_adapters_train_in_mixed_precision(base, mode, compile_):
    adapter_run(base, f"mixed-{mode}", f"--precision.mode={mode}", f"--train.compile={str(compile_).lower()}",
                "--train.steps=6", "--adapter.base_quant=int8" if mode == "fp16-mixed" else "--adapter.rslora=true")
    metrics = rundir.read_metrics(base / "runs" / f"mixed-{mode}" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    if mode == "bf16-mixed":
        # the base was stored in bf16 during training; the merged export is against the fp32 original,
        # as peft merges: the same logits as peft on the fp32 base
        run_cli("export-peft", base / "runs" / f"mixed-{mode}", base / f"peft-mixed-{mode}")
        final = base / "runs" / f"mixed-{mode}" / "final"
        assert (peft_logits(base, base / f"peft-mixed-{mode}") - our_logits(final)).abs().max() < 1e-4


def test_plan_of_an_adapter_recipe(base):
    from stagewise.adapters.sizes import adapter_sizes
    from stagewise.config.schema import AdapterConfig

    out = run_cli("plan", base / "lora.yaml", "--adapter.base_quant=nf4").stdout
    mcfg = rundir.load_model_config(base / "runs" / "base" / "final")
    sizes = adapter_sizes(mcfg, AdapterConfig(kind="lora", r=4, alpha=8, base_quant="nf4"), "fp32")
    assert f"trainable parameters {sizes['trainable']:>14,}" in out
    assert "stored packed nf4" in out and "optimizer" in out and "FLOPs per token" in out
