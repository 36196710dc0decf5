"""Recipe loading: every error path is one line naming the field and what is valid."""

import subprocess
import sys
from pathlib import Path

import pytest

from stagewise.config.loader import (config_reference_markdown, dump_yaml, from_dict, load_recipe,
                                     parse_override, read_yaml)
from stagewise.config.schema import RunConfig
from stagewise.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = "data:\n  sources: [{kind: python-stdlib}]\n"


def _load(tmp_path, text, overrides=()):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    return load_recipe(f, list(overrides))


def _error(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides(tmp_path):
    cfg = _load(tmp_path, BASE + "train: {steps: 7}\nschedule: {warmup_steps: 2}\n", ["--optim.lr=3e-4", "--model.qk_norm=true",
                                                          "--data.sources[0].kind=shakespeare"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.qk_norm is True
    assert cfg.data.sources[0].kind == "shakespeare"
    assert cfg.train.batch_size == RunConfig().train.batch_size


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # PyYAML reads `3e-4` as a string; a float field still takes it.
    assert _load(tmp_path, BASE + "optim: {lr: 3e-4}\n").optim.lr == 3e-4


@pytest.mark.parametrize("text,expected", [
    (BASE + "optim: {lr: fast}\n", 'optim.lr: expected a float > 0, got "fast"'),
    (BASE + "optim: {lr: -1.0}\n", "optim.lr: expected a float > 0, got -1.0"),
    (BASE + "optim: {lrr: 1.0}\n", "optim.lrr: unknown key; valid keys here: name, lr,"),
    (BASE + "bogus: 1\n", "bogus: unknown key; valid keys here: name, out_dir,"),
    (BASE + "train: {steps: 2.5}\n", "train.steps: expected an integer > 0, got 2.5"),
    (BASE + "train: {steps: true}\n", "train.steps: expected an integer > 0, got true"),
    (BASE + "train: {compile: yes please}\n", 'train.compile: expected true or false, got "yes please"'),
    (BASE + "precision: {mode: fp64}\n", 'precision.mode: expected one of fp32, tf32, bf16-mixed, fp16-mixed, '
     'bf16-pure, fp8, mxfp4, nvfp4, int8, int4, ternary, got "fp64"'),
    (BASE + "train: 3\n", "train: expected a mapping, got int"),
    (BASE + "optim: {beta2: 1.0}\n", "optim.beta2: expected a float >= 0 and < 1, got 1.0"),
    (BASE + "model: {n_heads: 6, n_kv_heads: 4}\n", "model.n_kv_heads: expected a divisor of n_heads=6, got 4"),
    (BASE + "model: {d_model: 100, n_heads: 3}\n", "model.n_heads: expected a divisor of d_model=100"),
    ("data: {seq_len: 128}\n", "data.sources: expected at least one source"),
    ("data: {sources: [{kind: text}]}\n", "data.sources[0].path: required for kind text"),
    ("data: {sources: [{kind: web}]}\n", 'data.sources[0].kind: expected one of text, jsonl, parquet,'),
    (BASE.rstrip() + "\n  seq_len: 4096\n", "data.seq_len: expected <= model.max_seq_len=2048, got 4096"),
    (BASE + "schedule: {warmup_steps: 5000}\ntrain: {steps: 10}\n", "schedule.warmup_steps: expected <= train.steps=10"),
    (BASE + "device: tpu\n", 'device: expected auto, cpu, cuda or cuda:N, got "tpu"'),
    (BASE + "name: ../escape\n", "name: expected letters, digits"),
    ("- a list\n", "expected a mapping of sections at the top level, got list"),
    ("train: {steps: [\n", "invalid YAML"),
])
def test_config_errors(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_override_errors(tmp_path):
    assert "optim.lr: expected a float > 0" in _error(tmp_path, BASE, ["--optim.lr=zero"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_override("--optim.lr")
    assert parse_override("--data.sources=[{kind: shakespeare}]") == ("data.sources", [{"kind": "shakespeare"}])


def test_yaml_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(f)
    assert not marker.exists()


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = _load(tmp_path, BASE + "optim: {lr: 1e-3}\n")
    again = from_dict(RunConfig, __import__("yaml").safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_every_recipe_in_repo_is_valid():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        load_recipe(r)


def test_docs_config_is_generated_from_schema():
    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == config_reference_markdown(), "docs/config.md is stale: run `make docs`"
    assert "`optim.lr`" in doc and "Peak learning rate" in doc


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + f"out_dir: {tmp_path / 'runs'}\noptim: {{lr: fast}}\n")
    proc = subprocess.run([sys.executable, "-m", "stagewise", "run", str(recipe)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == 'error: optim.lr: expected a float > 0, got "fast"'
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()
    proc = subprocess.run([sys.executable, "-m", "stagewise", "run", str(recipe), "--train.steps"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
