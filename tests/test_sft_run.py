"""The sft stage kind through the CLI: a run from a pre-trained stagewise model, exact resume after
SIGKILL, lm -> sft forgetting, chat samples, and every bad input failing in one line, exit 2, with
nothing written."""

import json
import shutil
import signal
from pathlib import Path

import pytest

from conftest import run_cli, tiny_recipe
from stagewise.rundir import read_metrics

TIMING = {"tokens_per_s", "mfu", "step_time_s", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_dir, data_cache) -> Path:
    """A tiny pre-trained stagewise model (its BPE carries the ChatML tokens)."""
    d = tmp_path_factory.mktemp("base")
    recipe = tiny_recipe(d / "base.yaml", corpus_dir, data_cache, d / "runs")
    run_cli("run", recipe, "--train.steps=6", "--name=base")
    return d / "runs" / "base"


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_recipe(d: Path, init_from: Path, data: Path, extra: str = "") -> Path:
    p = d / "sft.yaml"
    p.write_text(f"""
name: sft
out_dir: {d / 'runs'}
seed: 3
threads: 2
kind: sft
init_from: {init_from}
data: {{seq_len: 64}}
train: {{steps: 12, batch_size: 4}}
optim: {{lr: 1.0e-3}}
schedule: {{name: cosine, warmup_steps: 2}}
precision: {{mode: fp32}}
eval: {{every: 6, batches: 2}}
checkpoint: {{every: 5, keep_last: 3}}
log: {{progress: plain, every: 5}}
sft:
  data: [{{kind: jsonl, path: {data}}}, {{kind: arithmetic}}]
  val_fraction: 0.2
  arithmetic: {{train_count: 200, val_count: 20, format: reversed}}
  eval_generate: 8
  eval_max_new_tokens: 8
{extra}
sample: {{prompts: ["What is 2 plus 2?"], max_new_tokens: 6}}
""")
    return p


def test_sft_run_resume_is_bitwise_and_samples_chat(tmp_path, base):
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(80))
    recipe = sft_recipe(tmp_path, base, data)
    out = run_cli("run", recipe, "--name=full").stdout
    assert "--- chat sample (prompt 'What is 2 plus 2?') ---\nuser: What is 2 plus 2?\nassistant:" in out
    full = read_metrics(tmp_path / "runs" / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == list(range(1, 13))
    last = full[-1]
    assert 0.0 <= last["exact_match"] <= 1.0 and math_finite(last["val_loss"]) and "epoch" in last
    proc = run_cli("run", recipe, "--name=killed", env={"STAGEWISE_DEBUG_KILL_AT_STEP": "7"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run_cli("resume", tmp_path / "runs" / "killed")
    resumed = read_metrics(tmp_path / "runs" / "killed" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)


def math_finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


def test_lm_then_sft_keeps_measuring_forgetting(tmp_path, corpus_dir, data_cache):
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(f"""
name: staged
out_dir: {tmp_path / 'runs'}
seed: 5
threads: 2
model: {{d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 128}}
data: {{tokenizer: {{vocab_size: 512}}, cache_dir: {data_cache}, seq_len: 64, val_fraction: 0.1}}
train: {{batch_size: 4}}
precision: {{mode: fp32}}
schedule: {{name: cosine, warmup_steps: 1}}
eval: {{every: 4, batches: 2}}
checkpoint: {{every: 4, keep_last: 2}}
log: {{progress: none}}
stages:
  - name: code
    steps: 4
    mixture: [{{name: code, source: {{kind: text, path: {corpus_dir}}}}}]
  - name: chat
    kind: sft
    steps: 4
    sft: {{data: [{{kind: arithmetic}}], arithmetic: {{train_count: 100, val_count: 10}}, eval_generate: 4,
           eval_max_new_tokens: 4}}
sample: {{prompts: ["1+1="], max_new_tokens: 4}}
""")
    run_cli("run", recipe)
    run = tmp_path / "runs" / "staged"
    report = json.loads((run / "forgetting.json").read_text())
    assert report["domains"] == ["code", "chat"] and report["stages"] == ["code", "chat"]
    (code_after_lm, chat_after_lm), (code_after_sft, chat_after_sft) = report["matrix"]
    assert chat_after_lm is None and None not in (code_after_lm, code_after_sft, chat_after_sft)
    assert report["forgetting"][1][0] == pytest.approx(max(0.0, code_after_sft - code_after_lm))
    assert (run / "stages" / "chat" / "model.safetensors").is_file()


def _model_copy(base: Path, dest: Path, template: str | None) -> Path:
    shutil.copytree(base / "final", dest)
    if template is not None:
        (dest / "chat_template.jinja").write_text(template)
    return dest


BAD_ROWS = {
    "no-assistant": ([{"messages": [{"role": "user", "content": "hi"}]}], r"chat\.jsonl:1: .*assistant"),
    "unknown-role": ([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
                     r"chat\.jsonl:1: .*role"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_fail_in_one_line(tmp_path, base, case):
    rows, pattern = BAD_ROWS[case]
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(3) + rows + _chat_rows(3))
    rows_before = 3
    proc = run_cli("run", sft_recipe(tmp_path, base, data), check=False)
    _assert_one_line_error(proc, tmp_path, pattern.replace(":1:", f":{rows_before + 1}:"))


def test_template_that_fails_to_render(tmp_path, base):
    model = _model_copy(base, tmp_path / "model", "{{ raise_exception('this template refuses') }}")
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(10))
    proc = run_cli("run", sft_recipe(tmp_path, model, data), check=False)
    _assert_one_line_error(proc, tmp_path, r"chat\.jsonl:1: .*this template refuses")


def test_tokenizer_without_the_templates_special_tokens(tmp_path, base):
    gemma_like = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    model = _model_copy(base, tmp_path / "model", gemma_like)
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(10))
    proc = run_cli("run", sft_recipe(tmp_path, model, data), check=False)
    _assert_one_line_error(proc, tmp_path, r"writes .<(start|end)_of_turn>., which is not a token of this tokenizer")


def test_example_longer_than_seq_len_under_truncation_error(tmp_path, base):
    rows = _chat_rows(4) + [{"messages": [{"role": "user", "content": "long " * 200},
                                          {"role": "assistant", "content": "ok"}]}]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = sft_recipe(tmp_path, base, data)
    proc = run_cli("run", recipe, "--sft.truncation=error", check=False)
    _assert_one_line_error(proc, tmp_path, r"chat\.jsonl:5: the conversation is \d+ tokens, longer than data\.seq_len")


def _assert_one_line_error(proc, tmp_path: Path, pattern: str) -> None:
    import re

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_sft_from_an_imported_hugging_face_model(tmp_path):
    """kind sft with init_from a Hugging Face directory (a tiny Qwen2 built offline with the real
    Qwen2.5 chat template): the run uses the model's own template, trains, and `sample --chat`
    answers through it."""
    import transformers
    from test_chat_template import QWEN2_5, qwen_backend

    import torch

    hf_dir = tmp_path / "qwen"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=qwen_backend(), eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_5
    tok.save_pretrained(hf_dir)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(hf_dir)
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(60))
    recipe = sft_recipe(tmp_path, hf_dir, data)
    out = run_cli("run", recipe, "--train.steps=4", "--eval.every=0", "--sft.data=[{kind: jsonl, path: "
                  f"{data}}}]").stdout
    run = tmp_path / "runs" / "sft"
    assert (run / "chat_template.jinja").read_text() == QWEN2_5 or "Qwen" in (run / "tokenizer_config.json").read_text()
    assert "assistant:" in out
    rec = read_metrics(run / "metrics.jsonl")
    assert len(rec) == 4 and math_finite(rec[-1]["val_loss"])
    reply = run_cli("sample", run, "--chat", "--prompt", "What is 1 plus 1?", "--greedy", "--max-new-tokens", "4")
    assert reply.returncode == 0


def test_plan_shows_the_padding_waste(tmp_path, base):
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(40))
    out = run_cli("plan", sft_recipe(tmp_path, base, data)).stdout
    assert "# sft data" in out and "padding waste packed" in out and "(this recipe: packed)" in out
