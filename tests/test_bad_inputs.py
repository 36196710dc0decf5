"""Every bad input a user can hand stagewise, as a table: each case runs the real CLI entry point
(stagewise.cli.main, in this process) and must give exactly one line on stderr starting with `error:`,
a non-zero exit, no traceback, and leave nothing new on disk (the case's scratch directory and the
shared run are compared file by file before and after). Add a row with every new option or file format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_recipe
from stagewise.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus_dir, data_cache):
    """A finished tiny run, its export, a recipe and a scratch area the cases damage copies in."""
    root = tmp_path_factory.mktemp("bad")
    recipe = tiny_recipe(root / "tiny.yaml", corpus_dir, data_cache, root / "runs")
    recipe.write_text(recipe.read_text().replace("steps: 20", "steps: 4").replace("every: 5,", "every: 2,")
                      .replace("warmup_steps: 5", "warmup_steps: 1"))
    run_cli("run", recipe, "--name=good")
    run_cli("export", root / "runs" / "good", root / "export")
    return {"root": root, "recipe": recipe, "run": root / "runs" / "good", "export": root / "export",
            "corpus": corpus_dir, "cache": data_cache}


def _snapshot(*dirs: Path) -> dict:
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.name == ".lock":
                continue
            out[str(p)] = p.stat().st_size if p.is_file() else -1
    return out


def _recipe(w, case_dir: Path, edit: str = "", drop: str | None = None, text: str | None = None) -> Path:
    """The tiny recipe (or `text`) with `edit` appended or the lines starting with `drop` removed, written
    into the case's directory, its runs going there too."""
    base = text if text is not None else w["recipe"].read_text().replace(str(w["root"] / "runs"), str(case_dir / "runs"))
    if drop:
        base = "\n".join(line for line in base.splitlines() if not line.startswith(drop)) + "\n"
    path = case_dir / "r.yaml"
    path.write_text(base + edit)
    return path


def _run_dir_copy(w, case_dir: Path, damage) -> Path:
    run = case_dir / "run"
    shutil.copytree(w["run"], run)
    damage(run)
    return run


def _rm(rel):
    return lambda run: (run / rel).unlink()


def _write(rel, text):
    return lambda run: (run / rel).write_text(text)


def _hf_dir(w, case_dir: Path, config, weights: bool = True) -> Path:
    """A Hugging Face model directory with this config.json and (weights) a small real safetensors file."""
    from safetensors.torch import save_file

    d = case_dir / "hf"
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, d / "model.safetensors")
    return d


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512}

# (id, argv builder (world, case dir) -> argv, substring the error line must contain)
R = "run"
CASES = [
    # --- recipe values: types, ranges, choices, unknown keys --------------------------------------------------
    ("seed-too-large", lambda w, d: [R, _recipe(w, d), "--seed=5000000000"], "seed"),
    ("seed-negative", lambda w, d: [R, _recipe(w, d), "--seed=-1"], "seed"),
    ("seed-string", lambda w, d: [R, _recipe(w, d), "--seed=abc"], "seed"),
    ("steps-zero", lambda w, d: [R, _recipe(w, d), "--train.steps=0"], "train.steps"),
    ("steps-float", lambda w, d: [R, _recipe(w, d), "--train.steps=1.5"], "train.steps"),
    ("batch-zero", lambda w, d: [R, _recipe(w, d), "--train.batch_size=0"], "train.batch_size"),
    ("grad-accum-zero", lambda w, d: [R, _recipe(w, d), "--train.grad_accum=0"], "train.grad_accum"),
    ("grad-clip-negative", lambda w, d: [R, _recipe(w, d), "--train.grad_clip=-1"], "train.grad_clip"),
    ("spikes-action-unknown", lambda w, d: [R, _recipe(w, d), "--spikes.action=restart"], "spikes.action"),
    ("spikes-window-small", lambda w, d: [R, _recipe(w, d), "--spikes.window=2"], "spikes.window"),
    ("spikes-history-over-window", lambda w, d: [R, _recipe(w, d), "--spikes.min_history=60"],
     "spikes.min_history"),
    ("spikes-snapshot-every-zero", lambda w, d: [R, _recipe(w, d), "--spikes.snapshot_every=0"],
     "spikes.snapshot_every"),
    ("spikes-threshold-negative", lambda w, d: [R, _recipe(w, d), "--spikes.threshold=-1"], "spikes.threshold"),
    ("lr-negative", lambda w, d: [R, _recipe(w, d), "--optim.lr=-1e-3"], "optim.lr"),
    ("lr-string", lambda w, d: [R, _recipe(w, d), "--optim.lr=fast"], "optim.lr"),
    ("optim-unknown", lambda w, d: [R, _recipe(w, d), "--optim.name=sgd9"], "optim.name"),
    ("schedule-unknown", lambda w, d: [R, _recipe(w, d), "--schedule.name=zigzag"], "schedule.name"),
    ("warmup-negative", lambda w, d: [R, _recipe(w, d), "--schedule.warmup_steps=-2"], "schedule.warmup_steps"),
    ("min-lr-ratio-2", lambda w, d: [R, _recipe(w, d), "--schedule.min_lr_ratio=2"], "schedule.min_lr_ratio"),
    ("precision-unknown", lambda w, d: [R, _recipe(w, d), "--precision.mode=fp7"], "precision.mode"),
    ("d-model-zero", lambda w, d: [R, _recipe(w, d), "--model.d_model=0"], "model.d_model"),
    ("heads-not-divisor", lambda w, d: [R, _recipe(w, d), "--model.n_heads=5"], "n_heads=5"),
    ("kv-heads-not-divisor", lambda w, d: [R, _recipe(w, d), "--model.n_kv_heads=3"], "model.n_kv_heads"),
    ("odd-head-dim", lambda w, d: [R, _recipe(w, d), "--model.head_dim=15"], "model.head_dim"),
    ("seq-len-zero", lambda w, d: [R, _recipe(w, d), "--data.seq_len=0"], "data.seq_len"),
    ("seq-len-over-max", lambda w, d: [R, _recipe(w, d), "--data.seq_len=4096"], "seq_len"),
    ("val-fraction-zero", lambda w, d: [R, _recipe(w, d), "--data.val_fraction=0"], "data.val_fraction"),
    ("val-fraction-big", lambda w, d: [R, _recipe(w, d), "--data.val_fraction=0.9"], "data.val_fraction"),
    ("vocab-tiny", lambda w, d: [R, _recipe(w, d), "--data.tokenizer.vocab_size=3"], "vocab_size"),
    ("unknown-section", lambda w, d: [R, _recipe(w, d), "--trainer.steps=3"], "trainer"),
    ("unknown-key", lambda w, d: [R, _recipe(w, d), "--train.stepz=3"], "stepz"),
    ("override-syntax", lambda w, d: [R, _recipe(w, d), "train.steps=3"], "override"),
    ("override-no-value", lambda w, d: [R, _recipe(w, d), "--train.steps"], "train.steps"),
    ("kind-unknown", lambda w, d: [R, _recipe(w, d), "--kind=pretrain"], "kind"),
    ("device-gpu", lambda w, d: [R, _recipe(w, d), "--device=gpu"], "device"),
    ("device-cuda-absent", lambda w, d: [R, _recipe(w, d), "--device=cuda"], "device"),
    ("threads-negative", lambda w, d: [R, _recipe(w, d), "--threads=-1"], "threads"),
    ("eval-batches-zero", lambda w, d: [R, _recipe(w, d), "--eval.batches=0"], "eval.batches"),
    ("keep-last-zero", lambda w, d: [R, _recipe(w, d), "--checkpoint.keep_last=0"], "checkpoint.keep_last"),
    ("progress-unknown", lambda w, d: [R, _recipe(w, d), "--log.progress=fancy"], "log.progress"),
    ("tracker-unknown", lambda w, d: [R, _recipe(w, d), "--log.to=[jsonl,neptune]"], "log.to[1]"),
    ("tracker-twice", lambda w, d: [R, _recipe(w, d), "--log.to=[wandb,wandb]"], "log.to[1]"),
    ("tracker-not-a-list", lambda w, d: [R, _recipe(w, d), "--log.to=tensorboard"], "log.to"),
    ("tracker-project-slash", lambda w, d: [R, _recipe(w, d), "--log.project=a/b"], "log.project"),
    ("tracker-shorthand-number", lambda w, d: [R, _recipe(w, d, "log: [jsonl, 3]\n", drop="log:")], "log.to[1]"),
    ("log-not-a-mapping", lambda w, d: [R, _recipe(w, d, "log: 5\n", drop="log:")], "log"),
    ("empty-prompt", lambda w, d: [R, _recipe(w, d), "--sample.prompts=['']"], "sample.prompts[0]"),
    ("blank-prompt", lambda w, d: [R, _recipe(w, d), "--sample.prompts=['ok', '   ']"], "sample.prompts[1]"),
    ("top-p-zero", lambda w, d: [R, _recipe(w, d), "--sample.top_p=0"], "sample.top_p"),
    ("temperature-negative", lambda w, d: [R, _recipe(w, d), "--sample.temperature=-1"], "sample.temperature"),
    ("memory-limit-bad", lambda w, d: [R, _recipe(w, d), "--memory.limit=lots"], "memory.limit"),
    ("memory-limit-tiny", lambda w, d: [R, _recipe(w, d), "--memory.limit=1KiB"], "memory"),
    ("ac-unknown", lambda w, d: [R, _recipe(w, d), "--train.activation_checkpointing=some"],
     "train.activation_checkpointing"),
    ("parallel-unknown", lambda w, d: [R, _recipe(w, d), "--parallel.strategy=tp"], "parallel.strategy"),
    ("hsdp-one-replica", lambda w, d: [R, _recipe(w, d), "--parallel.strategy=hsdp", "--parallel.replicate=1"],
     "parallel.replicate"),
    ("adapter-unknown", lambda w, d: [R, _recipe(w, d), "--adapter.kind=ia3"], "adapter.kind"),
    ("adapter-rank-zero", lambda w, d: [R, _recipe(w, d), "--adapter.kind=lora", "--adapter.r=0"], "adapter.r"),
    ("bf16-pure-galore", lambda w, d: [R, _recipe(w, d), "--precision.mode=bf16-pure", "--optim.name=galore"],
     "optim.name"),
    ("apollo-mini-rank", lambda w, d: [R, _recipe(w, d), "--optim.name=apollo-mini", "--optim.rank=4"], "optim.rank"),
    # --- recipe files ------------------------------------------------------------------------------------------
    ("recipe-missing", lambda w, d: [R, d / "nope.yaml"], "nope.yaml"),
    ("recipe-directory", lambda w, d: [R, d], str("")),
    ("recipe-not-yaml", lambda w, d: [R, _recipe(w, d, text="model: [unclosed\n")], "r.yaml"),
    ("recipe-a-list", lambda w, d: [R, _recipe(w, d, text="- a\n- b\n")], "r.yaml"),
    ("recipe-empty", lambda w, d: [R, _recipe(w, d, text="")], "data"),
    ("recipe-binary", lambda w, d: [R, (d / "b.yaml", (d / "b.yaml").write_bytes(b"\xff\xfe\x00bad"))[0]], "b.yaml"),
    ("recipe-no-sources", lambda w, d: [R, _recipe(w, d, drop="  sources:")], "data.sources"),
    ("source-path-missing", lambda w, d: [R, _recipe(w, d), f"--data.sources=[{{kind: text, path: {d / 'absent'}}}]"],
     "absent"),
    ("source-kind-unknown", lambda w, d: [R, _recipe(w, d), "--data.sources=[{kind: video}]"], "kind"),
    ("source-empty-dir", lambda w, d: [R, _recipe(w, d), f"--data.sources=[{{kind: text, path: {d}}}]"], ""),
    ("out-dir-is-file", lambda w, d: [R, _recipe(w, d), f"--out_dir={(d / 'f', (d / 'f').write_text('x'))[0]}"],
     "out_dir"),
    ("cache-dir-is-file", lambda w, d: [R, _recipe(w, d), f"--data.cache_dir={(d / 'f', (d / 'f').write_text('x'))[0]}"],
     "data.cache_dir"),
    ("init-from-missing", lambda w, d: [R, _recipe(w, d), f"--init_from={d / 'no-model'}"], "no-model"),
    ("init-from-not-model", lambda w, d: [R, _recipe(w, d), f"--init_from={d}"], ""),
    ("tokenizer-path-missing", lambda w, d: [R, _recipe(w, d), f"--data.tokenizer.path={d / 'tok.json'}"], "tok.json"),
    ("stages-empty-mixture", lambda w, d: [R, _recipe(w, d), "--stages=[{name: a, steps: 2, mixture: []}]"], "stages"),
    ("stages-duplicate-names", lambda w, d: [R, _recipe(w, d), "--stages=[{name: a, steps: 2, mixture: [{name: c, "
                                             f"source: {{kind: text, path: {w['corpus']}}}}}]}}, {{name: a, steps: 2, "
                                             f"mixture: [{{name: c, source: {{kind: text, path: {w['corpus']}}}}}]}}]"],
     "stages"),
    # --- resume ------------------------------------------------------------------------------------------------
    ("resume-missing", lambda w, d: ["resume", d / "nothing"], "nothing"),
    ("resume-not-a-run", lambda w, d: ["resume", d], "not a stagewise run directory"),
    ("resume-no-run-info", lambda w, d: ["resume", _run_dir_copy(w, d, _rm("run_info.json"))], "run_info.json"),
    ("resume-bad-run-info", lambda w, d: ["resume", _run_dir_copy(w, d, _write("run_info.json", "{oops"))],
     "run_info.json"),
    ("resume-no-model-config", lambda w, d: ["resume", _run_dir_copy(w, d, _rm("model_config.json"))],
     "model_config.json"),
    ("resume-bad-config", lambda w, d: ["resume", _run_dir_copy(w, d, _write("config.yaml", "train: [\n"))],
     "config.yaml"),
    ("resume-edited-model", lambda w, d: ["resume", _run_dir_copy(w, d, lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("d_model: 64", "d_model: 96")))], "model.d_model was changed"),
    ("resume-no-tokenizer", lambda w, d: ["resume", _run_dir_copy(w, d, _rm("tokenizer.json"))], "tokenizer"),
    # --- sample ------------------------------------------------------------------------------------------------
    ("sample-empty-prompt", lambda w, d: ["sample", w["run"], "--prompt", ""], "--prompt"),
    ("sample-no-prompt", lambda w, d: ["sample", w["run"]], "--prompt"),
    ("sample-temperature-nan", lambda w, d: ["sample", w["run"], "--prompt", "x", "--temperature", "nan"],
     "--temperature"),
    ("sample-temperature-inf", lambda w, d: ["sample", w["run"], "--prompt", "x", "--temperature", "inf"],
     "--temperature"),
    ("sample-temperature-negative", lambda w, d: ["sample", w["run"], "--prompt", "x", "--temperature", "-1"],
     "--temperature"),
    ("sample-top-p-zero", lambda w, d: ["sample", w["run"], "--prompt", "x", "--top-p", "0"], "--top-p"),
    ("sample-top-p-big", lambda w, d: ["sample", w["run"], "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    ("sample-top-k-negative", lambda w, d: ["sample", w["run"], "--prompt", "x", "--top-k", "-3"], "--top-k"),
    ("sample-num-samples-zero", lambda w, d: ["sample", w["run"], "--prompt", "x", "--num-samples", "0"],
     "--num-samples"),
    ("sample-max-new-zero", lambda w, d: ["sample", w["run"], "--prompt", "x", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    ("sample-max-new-text", lambda w, d: ["sample", w["run"], "--prompt", "x", "--max-new-tokens", "ten"],
     "--max-new-tokens"),
    ("sample-seed-negative", lambda w, d: ["sample", w["run"], "--prompt", "x", "--seed", "-1"], "--seed"),
    ("sample-device-gpu", lambda w, d: ["sample", w["run"], "--prompt", "x", "--device", "gpu"], "device"),
    ("sample-missing-ckpt", lambda w, d: ["sample", d / "none", "--prompt", "x"], "none"),
    ("sample-empty-dir", lambda w, d: ["sample", d, "--prompt", "x"], ""),
    ("sample-ckpt-is-file", lambda w, d: ["sample", (d / "f", (d / "f").write_text("x"))[0], "--prompt", "x"], "f"),
    ("sample-tokenizer-too-big", lambda w, d: ["sample", _big_tokenizer_export(w, d), "--prompt", "x"],
     "more than the model's vocab_size"),
    ("sample-corrupt-weights", lambda w, d: ["sample", _corrupt_export(w, d), "--prompt", "x"], "model.safetensors"),
    ("sample-config-not-json", lambda w, d: ["sample", _export_copy(w, d, lambda e: (e / "config.json").write_text(
        "{")), "--prompt", "x"], "config.json"),
    ("sample-unknown-flag", lambda w, d: ["sample", w["run"], "--prompt", "x", "--beam", "4"], "--beam"),
    # --- eval --------------------------------------------------------------------------------------------------
    ("eval-seq-len-zero", lambda w, d: ["eval", w["run"], "--seq-len", "0"], "--seq-len"),
    ("eval-batch-size-zero", lambda w, d: ["eval", w["run"], "--batch-size", "0"], "--batch-size"),
    ("eval-batch-size-text", lambda w, d: ["eval", w["run"], "--batch-size", "eight"], "--batch-size"),
    ("eval-max-tokens-zero", lambda w, d: ["eval", w["run"], "--max-tokens", "0"], "--max-tokens"),
    ("eval-split-unknown", lambda w, d: ["eval", w["run"], "--split", "test"], "--split"),
    ("eval-data-missing", lambda w, d: ["eval", w["run"], "--data", str(d / "absent.txt")], "absent"),
    ("eval-data-empty", lambda w, d: ["eval", w["run"], "--data", str((d / "e.txt", (d / "e.txt").write_text(""))[0])],
     ""),
    ("eval-device-gpu", lambda w, d: ["eval", w["run"], "--device", "gpu"], "device"),
    ("eval-missing-ckpt", lambda w, d: ["eval", d / "none"], "none"),
    # --- export, export-hf, export-peft, import-hf, import-peft -------------------------------------------------------
    ("export-out-exists", lambda w, d: ["export", w["run"], d], "already exists"),
    ("export-out-under-file", lambda w, d: ["export", w["run"], (d / "f", (d / "f").write_text("x"))[0] / "out"],
     "is a file"),
    ("export-missing-ckpt", lambda w, d: ["export", d / "none", d / "out"], "none"),
    ("export-hf-out-exists", lambda w, d: ["export-hf", w["run"], d], "already exists"),
    ("export-hf-out-under-file", lambda w, d: ["export-hf", w["run"], (d / "f", (d / "f").write_text("x"))[0] / "o"],
     "is a file"),
    ("export-hf-arch-unknown", lambda w, d: ["export-hf", w["run"], d / "o", "--arch", "gpt2"], "--arch"),
    ("export-hf-dtype-unknown", lambda w, d: ["export-hf", w["run"], d / "o", "--dtype", "int8"], "--dtype"),
    ("export-hf-shard-size", lambda w, d: ["export-hf", w["run"], d / "o", "--max-shard-size", "big"],
     "--max-shard-size"),
    ("export-hf-missing-ckpt", lambda w, d: ["export-hf", d / "none", d / "o"], "none"),
    ("export-peft-no-adapters", lambda w, d: ["export-peft", w["run"], d / "o"], "adapter"),
    ("export-peft-out-under-file", lambda w, d: ["export-peft", w["run"], (d / "f", (d / "f").write_text("x"))[0] / "o"],
     "is a file"),
    ("import-hf-missing", lambda w, d: ["import-hf", d / "none", d / "o"], "none"),
    ("import-hf-no-config", lambda w, d: ["import-hf", (d / "hf", (d / "hf").mkdir())[0], d / "o"], "config.json"),
    ("import-hf-config-list", lambda w, d: ["import-hf", _hf_dir(w, d, "[1, 2]"), d / "o"], "JSON object"),
    ("import-hf-config-broken", lambda w, d: ["import-hf", _hf_dir(w, d, "{"), d / "o"], "not valid JSON"),
    ("import-hf-hidden-missing", lambda w, d: ["import-hf", _hf_dir(w, d, {k: v for k, v in LLAMA.items()
                                                                           if k != "hidden_size"}), d / "o"],
     "hidden_size"),
    ("import-hf-hidden-string", lambda w, d: ["import-hf", _hf_dir(w, d, {**LLAMA, "hidden_size": "64"}), d / "o"],
     "hidden_size"),
    ("import-hf-heads-zero", lambda w, d: ["import-hf", _hf_dir(w, d, {**LLAMA, "num_attention_heads": 0}), d / "o"],
     "num_attention_heads"),
    ("import-hf-unknown-arch", lambda w, d: ["import-hf", _hf_dir(w, d, {**LLAMA, "model_type": "gpt2",
                                                                         "architectures": ["GPT2LMHeadModel"]}), d / "o"],
     "not supported"),
    ("import-hf-no-weights", lambda w, d: ["import-hf", _hf_dir(w, d, LLAMA, weights=False), d / "o"],
     "no model.safetensors"),
    ("import-hf-weights-missing-tensors", lambda w, d: ["import-hf", _hf_dir(w, d, LLAMA), d / "o"], ""),
    ("import-hf-out-exists", lambda w, d: ["import-hf", _hf_dir(w, d, LLAMA), d], "already exists"),
    ("import-peft-missing", lambda w, d: ["import-peft", d / "none", w["export"], d / "o"], "none"),
    ("import-peft-out-exists", lambda w, d: ["import-peft", d, w["export"], d], "already exists"),
    # --- data prepare, plan, report, CLI -----------------------------------------------------------------------------
    ("prepare-out-exists", lambda w, d: ["data", "prepare", "--source", f"text:{w['corpus']}", "--out", str(d)],
     "already exists"),
    ("prepare-no-source", lambda w, d: ["data", "prepare", "--out", str(d / "o")], ""),
    ("prepare-source-missing", lambda w, d: ["data", "prepare", "--source", f"text:{d / 'none'}", "--out",
                                             str(d / "o")], "none"),
    ("prepare-vocab-zero", lambda w, d: ["data", "prepare", "--source", f"text:{w['corpus']}", "--vocab-size", "0",
                                         "--out", str(d / "o")], "--vocab-size"),
    ("prepare-tokenizer-missing", lambda w, d: ["data", "prepare", "--source", f"text:{w['corpus']}", "--tokenizer",
                                                str(d / "t.json"), "--out", str(d / "o")], "t.json"),
    ("plan-missing-recipe", lambda w, d: ["plan", d / "none.yaml"], "none.yaml"),
    ("plan-bad-override", lambda w, d: ["plan", _recipe(w, d), "--train.steps=-5"], "train.steps"),
    ("report-not-a-run", lambda w, d: ["report", d], ""),
    ("report-missing", lambda w, d: ["report", d / "none"], "none"),
    ("unknown-command", lambda w, d: ["fly"], "fly"),
    ("no-command", lambda w, d: [], "COMMAND"),
    ("extra-argument", lambda w, d: ["resume", w["run"], "extra"], "extra"),
]


def _export_copy(w, d: Path, damage) -> Path:
    e = d / "export"
    shutil.copytree(w["export"], e)
    damage(e)
    return e


def _corrupt_export(w, d: Path) -> Path:
    return _export_copy(w, d, lambda e: (e / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage"))


def _big_tokenizer_export(w, d: Path) -> Path:
    def grow(e):
        cfg = json.loads((e / "config.json").read_text())
        model = cfg.get("stagewise_model", cfg)
        model["vocab_size"] = 64  # the tokenizer has 512
        (e / "config.json").write_text(json.dumps(cfg))
    return _export_copy(w, d, grow)


def test_the_table_is_large_enough():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(world, case, tmp_path, capsys, monkeypatch):
    name, build, expected = case
    monkeypatch.chdir(tmp_path)  # a relative default (runs/, data_cache/) lands here, where it is checked
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = [str(a) for a in build(world, case_dir)]
    before = _snapshot(tmp_path, world["run"], world["export"])
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"{name}: exit {code}\n{out[-800:]}\n{err[-800:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{name}: stderr was\n{err[-2000:]}"
    assert "Traceback" not in err and expected in lines[0], f"{name}: {lines[0]!r} lacks {expected!r}"
    assert _snapshot(tmp_path, world["run"], world["export"]) == before, f"{name} left files behind"
