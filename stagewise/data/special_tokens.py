"""Which token ends a document, which begins one, and which stop generation, per tokenizer.

A tokenizer stagewise trains (byte-level BPE, `<|endoftext|>` as id 0, no post-processor) has one
answer: documents end with `<|endoftext|>`, nothing is prepended, sampling stops on `<|endoftext|>`.
An imported model's tokenizer has its own, spread over the Hugging Face side files, and it matters:
Gemma 3 was pre-trained on `<bos> document <eos>`; without the `<bos>` gemma-3-270m's loss on
held-out text is 4.93 instead of 3.68, and a fixed candidate list picks `</s>` (id 212, an
ordinary token to Gemma) as its separator. So the choice is made the way transformers makes it:

  eos       tokenizer_config.json eos_token (what AutoTokenizer reads), else special_tokens_map.json,
            else config.json / generation_config.json eos_token_id
  bos       tokenizer_config.json bos_token, else special_tokens_map.json (config.json's bos_token_id
            is not the tokenizer's: Qwen names one that its tokenizer never adds)
  add_bos   whether tokenizer.json's post-processor prepends a token (that token is then the bos).
            transformers >= 5 decides so too: with a tokenizer.json it drops tokenizer_config.json's
            add_bos_token/add_eos_token and keeps the post-processor (hub Gemma, Llama 2/3 and Mistral
            files agree on both; Qwen's add neither)
  stop_ids  eos plus generation_config.json eos_token_id, else config.json's (what generate() stops on)

The result is written beside tokenizer.json as SPECIALS_FILE wherever stagewise puts a tokenizer
(import-hf, prepared datasets, run directories, exports), so the data, the run and its samples agree
on it without the HF files. A tokenizer with none of these files and no BOS post-processor gets
stagewise's own default (`origin` empty, nothing written): trained tokenizers are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tokenizers import Tokenizer as HFTokenizer

from stagewise.errors import DataError

SPECIALS_FILE = "stagewise_special_tokens.json"


@dataclass(frozen=True)
class SpecialTokens:
    eos_id: int
    bos_id: Optional[int] = None
    add_bos: bool = False
    stop_ids: tuple[int, ...] = ()
    # The files the choice was read from; empty for stagewise's own default, which is never written.
    origin: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def default(cls, eos_id: int) -> "SpecialTokens":
        return cls(eos_id=eos_id, stop_ids=(eos_id,))

    @property
    def doc_prefix(self) -> list[int]:
        """Token ids every document (and prompt) starts with."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    def to_json(self, tok: HFTokenizer) -> dict:
        """The persisted form; token strings beside the ids so a reader can check they still match."""
        return {"eos_token": tok.id_to_token(self.eos_id), "eos_id": self.eos_id,
                "bos_token": None if self.bos_id is None else tok.id_to_token(self.bos_id), "bos_id": self.bos_id,
                "add_bos": self.add_bos, "stop_ids": list(self.stop_ids), "origin": list(self.origin)}


def resolve(tok: HFTokenizer, directory: Path, fallback_eos: Callable[[], int],
            hf_config: Optional[dict] = None) -> Optional[SpecialTokens]:
    """The special tokens of the tokenizer.json in `directory`: SPECIALS_FILE if it is there, else
    derived from the HF side files; None when there is nothing to derive from (stagewise's default)."""
    if (directory / SPECIALS_FILE).is_file():
        return read(directory / SPECIALS_FILE, tok)
    return derive(tok, directory, fallback_eos, hf_config)


def read(path: Path, tok: HFTokenizer) -> SpecialTokens:
    try:
        data = json.loads(path.read_text())
        ids = [data["eos_id"], data["bos_id"], *data["stop_ids"]]
        add_bos = data["add_bos"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid special-token file ({type(e).__name__}: {e}); "
                        "re-run stagewise import-hf") from None
    if not all(i is None or isinstance(i, int) for i in ids) or not isinstance(add_bos, bool):
        raise DataError(f"{path}: eos_id, bos_id and stop_ids must be token ids and add_bos a boolean")
    for key in ("eos", "bos"):
        i, name = data[f"{key}_id"], data.get(f"{key}_token")
        if i is not None and tok.id_to_token(i) != name:
            raise DataError(f"{path}: {key}_id {i} is {tok.id_to_token(i)!r} in tokenizer.json, not {name!r}; "
                            "the file belongs to another tokenizer (re-run stagewise import-hf)")
    return SpecialTokens(data["eos_id"], data["bos_id"], add_bos, tuple(data["stop_ids"]),
                         tuple(data.get("origin") or (path.name,)))


def write_bytes(specials: SpecialTokens, tok: HFTokenizer) -> bytes:
    return (json.dumps(specials.to_json(tok), indent=2) + "\n").encode("utf-8")


def derive(tok: HFTokenizer, directory: Path, fallback_eos: Callable[[], int],
           hf_config: Optional[dict] = None) -> Optional[SpecialTokens]:
    """SpecialTokens from the HF files in `directory` (see the module docstring for the order)."""
    files = {name: _json(directory / name) for name in
             ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")}
    if hf_config is None:
        hf_config = _hf_config(directory)
    origin = [name for name, data in files.items() if data is not None]
    tok_cfg, tok_map = files["tokenizer_config.json"] or {}, files["special_tokens_map.json"] or {}
    gen = files["generation_config.json"]

    def named(key: str) -> Optional[int]:
        for where, data in (("tokenizer_config.json", tok_cfg), ("special_tokens_map.json", tok_map)):
            name = _token_name(data.get(key))
            if name is not None:
                i = tok.token_to_id(name)
                if i is None:
                    raise DataError(f"{directory / where}: {key} {name!r} is not a token of tokenizer.json")
                return i
        return None

    eos = named("eos_token")
    config_eos = _ids((hf_config or {}).get("eos_token_id"))
    gen_eos = _ids(gen.get("eos_token_id")) if gen is not None else []
    if config_eos and (gen is None or eos is None):  # generate() falls back on config.json's ids
        origin.append("config.json")
    bos, prepended = named("bos_token"), _prepended(tok)
    add_bos, bos = prepended is not None, bos if prepended is None else prepended
    if add_bos:
        origin.append("tokenizer.json post-processor")
    if not origin:
        return None
    if eos is None:
        eos = config_eos[0] if config_eos else gen_eos[0] if gen_eos else fallback_eos()
    stop = [eos] + (gen_eos if gen is not None else config_eos)
    return SpecialTokens(eos, bos, add_bos, tuple(dict.fromkeys(stop)), tuple(origin))


def _json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def _hf_config(directory: Path) -> Optional[dict]:
    """The HF config beside a tokenizer: an HF config.json, the hf_config an import or a run kept."""
    for name in ("config.json", "hf_config.json"):
        data = _json(directory / name)
        if data is None:
            continue
        if data.get("format") == "stagewise":
            return data.get("hf_config")
        return data
    return None


def _token_name(value) -> Optional[str]:
    if isinstance(value, dict):  # an AddedToken as older transformers serialize it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _prepended(tok: HFTokenizer) -> Optional[int]:
    """The token tokenizer.json's post-processor puts before a text, if it puts exactly one there."""
    if tok.post_processor is None:
        return None
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    n = len(full) - len(plain)
    return full[0] if n >= 1 and full[1:1 + len(plain)] == plain else None
