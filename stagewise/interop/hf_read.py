"""Reading a Hugging Face model: a directory, hub id or GGUF file -> a checked stagewise model.

`load_hf` returns the ModelConfig, the state dict under stagewise names, the HF config and the
tokenizer, after checking everything the config implies (tensor names, shapes, float dtypes,
truncated shards, tokenizer size). Shared by `stagewise import-hf` (interop/hf_io.py) and by a
recipe's `init_from` of an HF directory (rundir.py); it writes nothing. transformers is imported
only for GGUF files (its dequantizing loader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from stagewise.config.schema import ModelConfig
from stagewise.errors import CheckpointError, ConfigError, DataError, StagewiseError
from stagewise.interop.hf_families import Family, family_of, from_hf_config, from_hf_state_dict, to_hf_state_dict

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ reading

def resolve_hf_source(src: str) -> Path:
    """A local directory as is; otherwise a hub id (org/name) fetched with huggingface_hub."""
    p = Path(src).expanduser()
    if p.exists():
        return p
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        raise CheckpointError(f"{src}: no such directory (and not a Hugging Face hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{src}: not a local directory; downloading a hub model needs huggingface_hub "
                              "(pip install huggingface_hub), or download it yourself and pass the directory") from None
    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated model: one line whatever the cause
        raise CheckpointError(f"{src}: cannot download from the Hugging Face hub ({type(e).__name__}); "
                              "pass a local model directory instead") from None


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a model directory; a missing or malformed one is a one-line CheckpointError."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what}), got a {type(data).__name__}")
    return data


def _read_shard(file: Path, names: set[str] | None, out: dict) -> None:
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if names is None or name in names:
                    out[name] = f.get_tensor(name)
    except StagewiseError:
        raise
    except Exception as e:  # safetensors raises its own types for a damaged or truncated file
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{file} cannot be read as safetensors ({type(e).__name__}: {detail}); "
                              "the file is truncated or corrupt") from None


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, or the shards its index names."""
    tensors: dict[str, torch.Tensor] = {}
    if (src / INDEX).is_file():
        weight_map = read_json(src / INDEX, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{src / INDEX}: expected a non-empty weight_map of tensor name -> shard file")
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in sorted(by_file.items()):
            if Path(file).name != file or not (src / file).is_file():
                raise CheckpointError(f"{src / INDEX}: shard {file!r} (holding e.g. {min(names)!r}) is missing")
            _read_shard(src / file, names, tensors)
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{src / INDEX}: tensor {absent[0]!r} is listed in shard "
                                  f"{weight_map[absent[0]]!r} but not stored there")
    elif (src / WEIGHTS).is_file():
        _read_shard(src / WEIGHTS, None, tensors)
    else:
        raise CheckpointError(f"{src}: no {WEIGHTS} or {INDEX}; expected a Hugging Face model saved with "
                              "safetensors (or pass a .gguf file)")
    return tensors


def _load_gguf(file: Path, tok_dir: Path) -> tuple[dict, dict]:
    """(HF config dict, state dict) of a GGUF file via transformers' dequantizing loader; the
    tokenizer it rebuilds is saved into `tok_dir`."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"{file}: importing a GGUF file needs transformers and gguf "
                              "(pip install transformers gguf)") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                                  dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (ImportError, ValueError, OSError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{file}: transformers cannot load this GGUF file ({first})") from None
    hf = model.config.to_dict()
    hf.pop("quantization_config", None)  # the weights are dequantized now; a re-save must not claim otherwise
    tok.save_pretrained(tok_dir)
    return hf, dict(model.state_dict())


# ------------------------------------------------------------------------------------------ checking

def _expected_tensors(mcfg: ModelConfig) -> dict[str, torch.Size]:
    from stagewise.model import Transformer

    with torch.device("meta"):
        model = Transformer(mcfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state(sd: dict, mcfg: ModelConfig, family: Family, source: str) -> None:
    """Every tensor the config implies is present with that shape and a float dtype (HF names in errors)."""
    def hf_name(ours: str) -> str:
        return next(iter(to_hf_state_dict({ours: None}, family, False)))

    expected = _expected_tensors(mcfg)
    for name, shape in expected.items():
        if name not in sd:
            raise CheckpointError(f"{source}: tensor {hf_name(name)!r} is missing (config.json describes a "
                                  f"{family.architecture} with {mcfg.n_layers} layers)")
        t = sd[name]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {hf_name(name)!r} has shape {list(t.shape)} but config.json "
                                  f"implies {list(shape)}; the config and the weights disagree")
        if t.dtype not in FLOAT_DTYPES:
            dtype = str(t.dtype).removeprefix("torch.")
            raise CheckpointError(f"{source}: tensor {hf_name(name)!r} has dtype {dtype}; "
                                  "expected float32, bfloat16 or float16")


def _check_tokenizer(path: Path, mcfg: ModelConfig, source: str, hf: dict):
    """The model's tokenizer, with the special tokens its own files (and `hf`, its config) name."""
    from stagewise.data import Tokenizer

    if not path.is_file():
        raise CheckpointError(f"{source}: no {TOKENIZER}; stagewise needs the fast tokenizer file "
                              "(save the tokenizer with transformers to create it)")
    try:
        tok = Tokenizer.load(path, hf_config=hf)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    if tok.vocab_size > mcfg.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the embedding has "
                              f"{mcfg.vocab_size} rows; the tokenizer does not belong to these weights")
    return tok


# ------------------------------------------------------------------------------------------ loading

def load_hf(src: str | Path, gguf_file: str | None = None, tok_dir: Path | None = None):
    """(ModelConfig, stagewise state dict, HF config dict, dir holding tokenizer files, Tokenizer) of
    an HF directory, hub id or GGUF file, fully validated."""
    src_s = str(src)
    if gguf_file is None and src_s.endswith(".gguf"):
        gguf_file, src_s = Path(src_s).name, str(Path(src_s).parent)
    path = resolve_hf_source(src_s)
    if gguf_file is not None:
        file = path / gguf_file
        if not file.is_file():
            raise CheckpointError(f"{file}: no such GGUF file")
        assert tok_dir is not None, "a GGUF import needs a directory for the rebuilt tokenizer"
        hf, raw = _load_gguf(file, tok_dir)
        files_dir = tok_dir
    else:
        hf = read_json(path / "config.json", "the model's config")
        family_of(hf)  # an unsupported architecture fails before any weights are read
        raw = read_hf_weights(path)
        files_dir = path
    family = family_of(hf)
    mcfg = from_hf_config(hf)
    try:
        from stagewise.model import validate_model_config

        validate_model_config(mcfg)
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None
    if mcfg.tie_embeddings and "lm_head.weight" in raw:
        raw = {k: v for k, v in raw.items() if k != "lm_head.weight"}  # the same matrix, stored twice
    sd = from_hf_state_dict(raw, family)
    check_state(sd, mcfg, family, str(path))
    if mcfg.tie_embeddings:
        sd.pop("output.weight", None)
    tok = _check_tokenizer(files_dir / TOKENIZER, mcfg, str(files_dir), hf)
    return mcfg, sd, hf, files_dir, tok
