"""The run directory: what a run writes, and how a model is found again from a path.

    RUN_DIR/
      config.yaml          the fully resolved recipe (what `stagewise resume` re-reads)
      model_config.json    the resolved model architecture (vocab size filled in)
      tokenizer.json       the tokenizer the data was encoded with (+ stagewise_special_tokens.json
                           for an imported one: its eos/bos/stop tokens, data/special_tokens.py)
      run_info.json        torch version, device, thread count, dataset used
      metrics.jsonl        one line per optimizer step (read back with `read_metrics`)
      forgetting.json      multi-stage runs: loss on every domain after each stage (eval/forgetting.py)
      checkpoints/step_NNNNNNNN/   full training state (DCP + train_state.json)
      final/               model.safetensors + config.json + tokenizer.json at the end

`stagewise sample/eval` accept a run directory (its newest checkpoint), a checkpoint
directory, or an exported directory (model.safetensors + config.json); a recipe's `init_from`
also a Hugging Face model directory (read by interop/hf_read.py). Importing this module does
not import torch (the report reads run directories without it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.config.loader import from_dict
from stagewise.config.schema import ModelConfig
from stagewise.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

CONFIG = "config.yaml"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
FORGETTING = "forgetting.json"
MEMORY = "memory.json"
RUN_INFO = "run_info.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"


def new_run_dir(out_dir: str, name: str) -> Path:
    """out_dir/name, or out_dir/name-2, -3 ... if taken: a new run never overwrites an old one."""
    base = Path(out_dir) / name
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{name}-{n}")
    return path


LOCK = ".lock"


class RunLock:
    """An exclusive lock on RUN_DIR while a run or resume drives it: a second one of the same directory
    stops with one line naming the holder. flock: the kernel releases it when the holder exits, however
    it exits, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        import fcntl
        import os

        self.file = open(Path(run_dir) / LOCK, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise CheckpointError(f"{run_dir} is in use by process {holder} (a stagewise run or resume of it); "
                                  "wait for it to finish or stop it, then resume") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the last descriptor drops the flock


def check_new_dir(path: str | Path, what: str = "output directory") -> Path:
    """A directory about to be created: it must not exist, and nothing on its way may be a file."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path}: already exists; choose a new {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{path}: {parent} is a file, not a directory; choose another {what}")
            break
    return path


def check_dir_or_absent(path: str | Path, what: str) -> None:
    """A directory stagewise writes into (out_dir, data.cache_dir): absent, or a directory."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what}: {p} is a file; expected a directory (or a path that does not exist)")
            return


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records in step order ([] before the first step is logged).

    A run still writing may leave a torn last line (no newline yet): skipped. Any other line that
    is not a JSON object with an integer `step` is a CheckpointError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines) and not text.endswith("\n"):
                break
            raise CheckpointError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise CheckpointError(f"{path}:{n}: expected a JSON object with an integer 'step'")
        records.append(rec)
    return sorted(records, key=lambda r: r["step"])


def resolve_model_source(path: str | Path) -> tuple[str, Path, Path]:
    """Classify `path` -> (kind, weights_path, dir holding model_config/config.json and tokenizer.json)."""
    from stagewise.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint, run directory or exported model")
    if (p / "model.safetensors").is_file():
        return "export", p, p
    if (p / CHECKPOINTS).is_dir():
        ckpt = latest_checkpoint(p / CHECKPOINTS)
        if ckpt is None:
            raise CheckpointError(f"{p}: run directory has no complete checkpoint yet")
        return "dcp", ckpt, p
    if (p / ".metadata").is_file():
        return "dcp", p, p.parent.parent
    raise CheckpointError(f"{p}: not a run directory, a checkpoint (step_*/ with .metadata) "
                          "or an exported model (model.safetensors + config.json)")


def tokenizer_files(meta_dir: Path) -> dict[str, Path]:
    """What travels with a model's tokenizer: tokenizer.json and, for an imported one, its special tokens
    and chat template (a stagewise BPE's built-in ChatML follows from its vocabulary)."""
    from stagewise.data.chat import TEMPLATE_FILE
    from stagewise.data.special_tokens import SPECIALS_FILE

    files = {TOKENIZER: meta_dir / TOKENIZER}
    for name in (SPECIALS_FILE, TEMPLATE_FILE):
        if (meta_dir / name).is_file():
            files[name] = meta_dir / name
    return files


def load_model_config(meta_dir: Path) -> ModelConfig:
    """A run directory's model_config.json, or the architecture in an export's config.json
    (checkpoint/export.py's export_config)."""
    for name in (MODEL_CONFIG, "config.json"):
        f = meta_dir / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{f}: not valid JSON ({e}); the model description is damaged") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{f}: expected a JSON object describing the model, got a {type(data).__name__}")
            data = data.get("stagewise_model", data)
            return from_dict(ModelConfig, data, "model")
    raise CheckpointError(f"{meta_dir}: no {MODEL_CONFIG} or config.json describing the model")


def original_hf_config(meta_dir: Path) -> dict | None:
    """The HF config an imported model came from, if `meta_dir` recorded one: an export's
    config.json (its `hf_config`) or a run directory's hf_config.json (a run with an HF init_from)."""
    for name in ("config.json", "hf_config.json"):
        f = meta_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            if "hf_config" in data:
                return data["hf_config"]
            if name == "hf_config.json":
                return data
    return None


def load_model(path: str | Path, device: torch.device):
    """(model in eval mode, tokenizer, model config) from any of the accepted paths."""
    from stagewise.checkpoint import load_model_state
    from stagewise.data import Tokenizer
    from stagewise.model import Transformer

    _, weights, meta_dir = resolve_model_source(path)
    mcfg = load_model_config(meta_dir)
    tok_path = meta_dir / TOKENIZER
    if not tok_path.is_file():
        raise CheckpointError(f"{meta_dir}: missing {TOKENIZER}")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise CheckpointError(f"{tok_path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {mcfg.vocab_size}; it belongs to another model")
    record = _adapter_record(weights)
    if record is not None:  # an adapter run's checkpoint: its base plus its adapters
        from stagewise.adapters.rebuild import load_adapter_checkpoint

        return load_adapter_checkpoint(weights, record, mcfg).to(device).eval(), tokenizer, mcfg
    model = Transformer(mcfg)
    state = load_model_state(weights)
    if mcfg.tie_embeddings:
        state.pop("output.weight", None)  # the head is the embedding; stored once
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (mcfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)
    return model.eval(), tokenizer, mcfg


def _adapter_record(weights: Path) -> dict | None:
    """The checkpoint record of a trainable-only (adapter) checkpoint, else None."""
    if not (weights / ".metadata").is_file():
        return None
    from stagewise.checkpoint.store import read_train_record

    record = read_train_record(weights)
    return record if record.get("trainable_only") and record["train_state"].get("adapter") else None


def _peft_base(p: Path) -> Path | None:
    """The local base model of a PEFT adapter directory (its base_model_name_or_path), None when `p` is
    not one; a base that is not a local directory is refused in one line."""
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file() or (p / "config.json").is_file():
        return None
    from stagewise.interop.hf_read import read_json

    base = read_json(cfg_file, "the PEFT adapter's config").get("base_model_name_or_path") or ""
    candidate = Path(base).expanduser()
    if not candidate.is_absolute():
        candidate = p / candidate if (p / candidate).is_dir() else candidate
    if not base or not candidate.is_dir():
        raise ConfigError(f"init_from {p}: a PEFT adapter whose base_model_name_or_path {base!r} is not a local model "
                          f"directory; run stagewise import-peft {p} BASE OUT and use OUT as init_from")
    return candidate


def _is_hf_dir(p: Path) -> bool:
    from stagewise.checkpoint.export import EXPORT_FORMAT
    from stagewise.interop.hf_read import read_json

    cfg_file = p / "config.json"
    return cfg_file.is_file() and not (p / MODEL_CONFIG).is_file() \
        and read_json(cfg_file, "the model's config").get("format") != EXPORT_FORMAT


def load_init_source(path: str | Path):
    """(model config, model state, dir holding tokenizer.json and its side files, HF config or None)
    for a recipe's `init_from`: any path `load_model` accepts, or a Hugging Face model directory."""
    from stagewise.checkpoint import load_model_state
    from stagewise.interop.hf_read import load_hf

    p = Path(path).expanduser()
    if _is_hf_dir(p):
        mcfg, state, hf, files_dir, _ = load_hf(p)
        return mcfg, state, files_dir, hf
    if _peft_base(p) is not None:  # a PEFT adapter: its base with the adapter merged in
        from stagewise.adapters.peft_format import peft_merged

        return peft_merged(p, _peft_base(p))
    _, weights, meta_dir = resolve_model_source(p)
    if _adapter_record(weights) is not None:
        import torch

        from stagewise.adapters import merged_state_dict

        model = load_model(p, torch.device("cpu"))[0]
        return load_model_config(meta_dir), merged_state_dict(model), meta_dir, original_hf_config(meta_dir)
    return load_model_config(meta_dir), load_model_state(weights), meta_dir, original_hf_config(meta_dir)


def load_init_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """(model config, dir holding tokenizer.json) of an `init_from`, without reading its weights."""
    from stagewise.interop.hf_families import from_hf_config
    from stagewise.interop.hf_read import read_json
    from stagewise.model import validate_model_config

    p = Path(path).expanduser()
    if _peft_base(p) is not None:
        return load_init_config(_peft_base(p))
    if _is_hf_dir(p):
        mcfg = from_hf_config(read_json(p / "config.json", "the model's config"))
        try:
            validate_model_config(mcfg)
        except ConfigError as e:
            raise ConfigError(f"{p / 'config.json'}: {e}") from None
        return mcfg, p
    _, _, meta_dir = resolve_model_source(p)
    return load_model_config(meta_dir), meta_dir


def load_weights(model, state: dict, what: str) -> None:
    """Load a full model state into `model`; a tied head may be absent or present (it is the embedding)."""
    tied = model.cfg.tie_embeddings
    if tied:
        state = {k: v for k, v in state.items() if k != "output.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{what}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
