"""`stagewise plan`: the imported model under init_from, memory as overhead + state, the GEMM peak's record.

References: parameter and matmul counts of an init_from model come from transformers' own module
(`parameters()`, its nn.Linear weights), not from our arithmetic; the process overhead is bracketed by
two real processes measured here (a fresh `import torch, stagewise` below it, a real training run's
logged peak above it); the peak cache's conditions are compared with the clock and os.getloadavg().
"""

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import torch

from conftest import run_cli, tiny_recipe
from stagewise.cli import main
from stagewise.data import train_bpe
from stagewise.rundir import read_metrics
from stagewise.train import metrics as M

transformers = pytest.importorskip("transformers")

HWM = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"


@pytest.fixture(scope="module")
def machine_cache(tmp_path_factory):
    """One per-machine cache for this module: the overhead is measured once, as on a real machine."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture()
def cache(machine_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(machine_cache))
    return machine_cache / "stagewise"


def qwen3_dir(d, corpus_dir):
    cfg = transformers.Qwen3Config(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.save_pretrained(d)
    train_bpe([p.read_text() for p in sorted(corpus_dir.iterdir())[:3]], 300).save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|endoftext|>"}))
    return model


def _number(out: str, label: str) -> int:
    return int(re.search(rf"^ *{re.escape(label)}\s+([\d,]+)", out, re.M).group(1).replace(",", ""))


def _mib(out: str, label: str) -> float:
    value, unit = re.search(rf"^  {label}\s+([\d.]+) (MiB|GiB)", out, re.M).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def test_plan_with_init_from_shows_the_imported_model(tmp_path, corpus_dir, data_cache, cache, capsys):
    from stagewise.interop.hf_io import import_hf

    hf = qwen3_dir(tmp_path / "hf", corpus_dir)
    import_hf(tmp_path / "hf", tmp_path / "sw", log=lambda m: None)
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")  # d_model 64, 2 layers
    total = sum(p.numel() for p in hf.parameters())
    matmul = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    seq, cfg = 64, hf.config
    for source in (tmp_path / "hf", tmp_path / "sw"):  # an HF directory and its import
        assert main(["plan", str(recipe), f"--init_from={source}"]) == 0
        out = capsys.readouterr().out
        assert _number(out, "parameters:") == total
        assert _number(out, "in matmuls (N):") == matmul
        assert _number(out, "FLOPs per token:") == 6 * matmul + 12 * cfg.num_hidden_layers * \
            cfg.num_attention_heads * cfg.head_dim * seq
        assert f"imported from {source}" in out and "d_model: 96" in out and "d_model: 64" not in out
        rope = 2 * 4 * cfg.max_position_embeddings * cfg.head_dim  # the cos/sin buffers
        assert _mib(out, "weights") == pytest.approx((4 * total + rope) / 2**20, abs=0.05)  # fp32 weights
        # The total is the fixed overhead plus the step's predicted peak, both printed.
        assert _mib(out, "total") == pytest.approx(_mib(out, "peak") + _mib(out, "overhead"), abs=0.15)
        overhead = next(iter(json.loads((cache / "process_overhead.json").read_text()).values()))
        assert _mib(out, "overhead") == pytest.approx(overhead["bytes"] / 2**20, abs=0.05)
    # A seq_len the source cannot hold fails as training would, in one line.
    assert main(["plan", str(recipe), f"--init_from={tmp_path / 'sw'}", "--data.seq_len=512"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len: expected <= 256 (max_seq_len of init_from" in err and err.count("\n") == 1


def test_process_overhead_lies_between_two_real_processes(tmp_path, cache, corpus_dir, data_cache, monkeypatch):
    entry = M.process_overhead()
    fresh = subprocess.run([sys.executable, "-c", "import torch, stagewise\n" + HWM], capture_output=True,
                           text=True, check=True).stdout
    # The probe imports torch, stagewise and its training stack: at least a bare `import torch, stagewise`
    # (5% slack for what differs between two runs of one interpreter) ...
    assert entry["bytes"] >= 0.95 * int(fresh) * 1024 > 0
    # ... and less than a real training run, which holds all of it plus the training state.
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")
    run_cli("run", recipe, "--train.steps=3", "--schedule.warmup_steps=0", "--checkpoint.every=0",
            "--eval.every=0", "--sample.prompts=[]")
    peak = max(r["peak_mem_bytes"] for r in read_metrics(tmp_path / "runs" / "tiny" / "metrics.jsonl"))
    assert entry["bytes"] < peak
    assert datetime.fromisoformat(entry["measured_at"]) > datetime.now(timezone.utc) - timedelta(minutes=10)
    # Measured once per machine: a second call reads the cache and starts no process.
    monkeypatch.setattr(M.subprocess, "run", lambda *a, **k: pytest.fail("measured twice"))
    assert M.process_overhead() == entry


def test_peak_cache_records_when_and_under_what_load(cache, monkeypatch):
    monkeypatch.delenv(M.PEAK_ENV, raising=False)
    monkeypatch.setattr(M, "measure_peak_flops", lambda d, t: 7e10)
    cpu = torch.device("cpu")
    key = M.peak_key(cpu, torch.float64)
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    entry = M.peak_flops_entry(cpu, torch.float64)
    assert entry["flops"] == M.peak_flops(cpu, torch.float64) == 7e10
    assert before <= datetime.fromisoformat(entry["measured_at"]) <= datetime.now(timezone.utc)
    assert entry["cpus"] == os.cpu_count() and entry["threads"] == torch.get_num_threads()
    assert len(entry["loadavg"]) == 3 and all(abs(a - b) < 1.0 for a, b in zip(entry["loadavg"], os.getloadavg()))
    assert json.loads((cache / "peak_flops.json").read_text())[key] == entry
    monkeypatch.setattr(M, "measure_peak_flops", lambda d, t: 8e10)
    assert M.peak_flops(cpu, torch.float64) == 7e10  # cached: not re-measured
    assert M.peak_flops_entry(cpu, torch.float64, "always")["flops"] == 8e10  # what --measure-peak does
    assert M.peak_flops(cpu, torch.float64) == 8e10


def test_old_cache_entries_without_conditions_still_read(tmp_path, cache, corpus_dir, data_cache, monkeypatch,
                                                          capsys):
    monkeypatch.delenv(M.PEAK_ENV, raising=False)
    monkeypatch.setattr(M, "measure_peak_flops", lambda d, t: pytest.fail("re-measured"))
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(2)  # the tiny recipe's thread count, which plan sets too
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "peak_flops.json").write_text(json.dumps({M.peak_key(cpu, torch.float32): 5e10}))  # old format
        assert M.peak_flops(cpu, torch.float32) == 5e10
        assert M.peak_flops_entry(cpu, torch.float32) == {"flops": 5e10}
        recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")  # fp32, 2 threads
        assert main(["plan", str(recipe)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "5.000e+10 FLOP/s torch.float32 on cpu, 2 threads (measured before stagewise recorded when" in out


def test_plan_measure_peak_remeasures_and_prints_its_conditions(tmp_path, cache, corpus_dir, data_cache):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus_dir, data_cache, tmp_path / "runs")  # fp32: ~1 s to measure
    env = {"XDG_CACHE_HOME": str(cache.parent), M.PEAK_ENV: ""}
    out = run_cli("plan", recipe, "--measure-peak", env=env).stdout
    line = re.search(r"^  ([\d.e+]+) FLOP/s torch.float32 on cpu, 2 threads \(measured (\S+), load average "
                     r"([\d./]+) \(1/5/15 min\) on (\d+) CPUs\)$", out, re.M)
    assert line, out
    entries = json.loads((cache / "peak_flops.json").read_text())
    entry = next(e for k, e in entries.items() if "threads=2|torch.float32" in k)
    assert f"{entry['flops']:.3e}" == line.group(1) and entry["measured_at"] == line.group(2)
    assert 1e9 < entry["flops"] < 1e14 and int(line.group(4)) == os.cpu_count()
    run_cli("plan", recipe, "--measure-peak", env=env)  # re-measures: a newer entry replaces it
    newer = next(e for k, e in json.loads((cache / "peak_flops.json").read_text()).items()
                 if "threads=2|torch.float32" in k)
    assert datetime.fromisoformat(newer["measured_at"]) > datetime.fromisoformat(entry["measured_at"])
    # Without the flag plan shows the cached value and does not measure.
    assert re.search(r"^  [\d.e+]+ FLOP/s torch.float32 on cpu, 2 threads \(measured ", run_cli(
        "plan", recipe, env=env).stdout, re.M)
    help_text = run_cli("plan", "--help").stdout
    assert "--measure-peak" in help_text and "load" in help_text
