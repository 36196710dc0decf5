"""`stagewise import-hf` / `export-hf`: Hugging Face model directories <-> stagewise export directories.

An HF directory is config.json + model.safetensors (or shards listed in model.safetensors.index.json)
+ tokenizer.json (+ tokenizer_config.json with its chat template, generation_config.json, ...).
Import writes what `stagewise sample/eval` and `init_from` accept:

    OUT/model.safetensors   stagewise tensor names, the source dtype, a tied head stored once
    OUT/config.json         {"format": "stagewise", "stagewise_model": {...}, "hf_config": {...}}
    OUT/tokenizer.json      + the HF tokenizer/generation side files, copied unchanged
    OUT/stagewise_special_tokens.json  the eos/bos/add_bos/stop tokens those files name
                            (stagewise/data/special_tokens.py), used for data, sampling and eval

Export writes the family's own config.json and tensor names, sharded above `max_shard_bytes`, so
transformers' AutoModelForCausalLM/AutoTokenizer load it. Everything is checked before anything
is written (names, shapes, dtypes, truncated files, tokenizer size); a failure writes nothing.
transformers is imported only for GGUF files (its dequantizing loader).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stagewise.checkpoint._atomic import TMP_PREFIX, fsync_tree, publish_dir
from stagewise.config.schema import ModelConfig
from stagewise.data.special_tokens import SPECIALS_FILE
from stagewise.errors import CheckpointError, ConfigError, DataError, StagewiseError
from stagewise.interop.hf_families import FAMILIES, Family, family_of, from_hf_config, from_hf_state_dict
from stagewise.interop.hf_families import infer_family, to_hf_config, to_hf_state_dict

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Copied unchanged in both directions: AutoTokenizer and generate() read them.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.model",
              "chat_template.jinja", "chat_template.json", "added_tokens.json")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size


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


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


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
        weight_map = _read_json(src / INDEX, "the shard index").get("weight_map")
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


def _fresh_out(out: Path) -> Path:
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    publish_dir(tmp, out)


# ------------------------------------------------------------------------------------------ import

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
        hf = _read_json(path / "config.json", "the model's config")
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


def import_hf(src: str | Path, out: str | Path, gguf_file: str | None = None, log=print) -> Path:
    """Convert an HF model (directory, hub id or GGUF file) into a stagewise export directory at `out`."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output directory")
    with tempfile.TemporaryDirectory(prefix="stagewise-gguf-tok-") as tok_tmp:
        mcfg, sd, hf, files_dir, tok = load_hf(src, gguf_file, Path(tok_tmp))
        tmp = _fresh_out(out)
        try:
            meta = {"format": "pt"}
            if mcfg.tie_embeddings:
                meta["output.weight"] = "tok_embeddings.weight"  # the convention load_model_state restores
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp / WEIGHTS, metadata=meta)
            config = {"format": "stagewise", "stagewise_model": dataclasses.asdict(mcfg), "hf_config": hf}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in (TOKENIZER, *SIDE_FILES):
                if (files_dir / name).is_file():
                    shutil.copyfile(files_dir / name, tmp / name)
            if tok.specials.origin:
                (tmp / SPECIALS_FILE).write_bytes(tok.specials_json())
            _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    n = sum(t.numel() for t in sd.values())
    bos = f", every document starts with {tok.backend.id_to_token(tok.bos_id)!r}" if tok.add_bos else ""
    log(f"imported {family_of(hf).architecture} ({n:,} parameters) -> {out}; documents end with "
        f"{tok.eos_token!r}{bos}")
    return out


# ------------------------------------------------------------------------------------------ export

def original_hf_config(meta_dir: Path) -> dict | None:
    """The HF config an imported model came from, if `meta_dir` (export or run dir) recorded one."""
    for name in ("config.json", "hf_config.json"):
        f = meta_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            if "hf_config" in data:
                return data["hf_config"]
            if name == "hf_config.json":
                return data
    return None


def write_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index.json above the size limit."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
        return [WEIGHTS]
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        files.append(file)
        weight_map.update({name: file for name in shard})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files + [INDEX]


def export_hf(ckpt: str | Path, out: str | Path, family: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "float32", log=print) -> Path:
    """Write `ckpt` (run, checkpoint or export dir) as an HF directory of `family` at `out`."""
    from stagewise.rundir import load_model, resolve_model_source

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output directory")
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"--arch: expected one of {', '.join(FAMILIES)}, got {family!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    _, _, meta_dir = resolve_model_source(ckpt)
    model, tok, mcfg = load_model(ckpt, torch.device("cpu"))
    original = original_hf_config(meta_dir)
    if family is not None:
        fam = FAMILIES[family]
    elif original is not None and original.get("model_type") in FAMILIES:
        fam = FAMILIES[original["model_type"]]
    else:
        fam = infer_family(mcfg)
    if original is not None and original.get("model_type") != fam.model_type:
        original = None  # another family's fields would only confuse its loader
    hf = to_hf_config(mcfg, fam, original)
    hf["dtype"] = hf["torch_dtype"] = dtype  # transformers >= 5 reads dtype, older versions torch_dtype
    if original is None:
        hf.setdefault("eos_token_id", tok.eos_id)
    sd = to_hf_state_dict(model.state_dict(), fam, mcfg.tie_embeddings)
    tensors = {k: v.detach().to(torch_dtype).contiguous().clone() for k, v in sd.items()}
    tmp = _fresh_out(out)
    try:
        files = write_sharded(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in (TOKENIZER, *SIDE_FILES):
            if (meta_dir / name).is_file():
                shutil.copyfile(meta_dir / name, tmp / name)
        if not (tmp / "tokenizer_config.json").is_file():
            # A tokenizer we trained ourselves: tell AutoTokenizer to wrap tokenizer.json as it is.
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
                "model_max_length": mcfg.max_seq_len}, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {fam.architecture} -> {out} ({', '.join(files)})")
    return out
