"""Shared fixtures: a small real corpus (Python source from the stdlib) and tiny recipes."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

# MFU needs the machine's peak GEMM rate; the 1 s benchmark is measured for real in
# test_train_components, everywhere else a fixed value keeps tests fast and hermetic.
os.environ.setdefault("STAGEWISE_PEAK_FLOPS", "1e11")

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["argparse.py", "ast.py", "bisect.py", "calendar.py", "collections/__init__.py", "colorsys.py",
           "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py",
           "fractions.py", "functools.py", "glob.py", "heapq.py", "inspect.py", "json/decoder.py",
           "json/encoder.py", "keyword.py", "linecache.py", "operator.py", "pathlib.py", "pprint.py",
           "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "textwrap.py",
           "tokenize.py", "typing.py", "uuid.py", "weakref.py"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~1.3 MB of real Python: a few dozen stdlib modules copied as a text source."""
    d = tmp_path_factory.mktemp("corpus")
    for m in MODULES:
        shutil.copy(STDLIB / m, d / m.replace("/", "_"))
    return d


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def tiny_recipe(path: Path, corpus: Path, cache: Path, out_dir: Path) -> Path:
    """A 2-layer, 64-wide model on the small corpus: a few seconds for 20 steps."""
    text = f"""
name: tiny
out_dir: {out_dir}
seed: 7
threads: 2
model: {{d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 128}}
data:
  sources: [{{kind: text, path: {corpus}}}]
  tokenizer: {{vocab_size: 512}}
  cache_dir: {cache}
  seq_len: 64
  val_fraction: 0.1
train: {{steps: 20, batch_size: 8}}
optim: {{lr: 3.0e-3}}
schedule: {{name: cosine, warmup_steps: 5}}
precision: {{mode: fp32}}
eval: {{every: 10, batches: 2}}
checkpoint: {{every: 5, keep_last: 3}}
log: {{progress: plain, every: 5}}
sample: {{prompts: ["def "], max_new_tokens: 8}}
"""
    path.write_text(text)
    return path


def run_cli(*args, env=None, check=True, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "stagewise", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stagewise {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def system_dep(present: bool, what: str):
    """Skip a test whose Debian package is missing only where `make test` could not have installed it
    (apt needs root, Makefile: system-deps); as root, or in CI (.ci/run sets STAGEWISE_CI), a missing
    package fails the test instead."""
    return pytest.mark.skipif(not present and os.geteuid() != 0 and not os.environ.get("STAGEWISE_CI"),
                              reason=f"needs {what} (as root: apt-get install {what}; make system-deps)")
