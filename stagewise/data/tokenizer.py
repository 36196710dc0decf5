"""A thin wrapper over a Hugging Face `tokenizers.Tokenizer`: train a byte-level BPE or load a tokenizer.json.

Byte-level BPE (GPT-2 style) maps every UTF-8 byte to a printable symbol before merging,
so there is no unknown token and decode(encode(s)) == s for every Unicode string,
including whitespace runs in code. The wrapper fixes the few choices that matter for a
data pipeline: no implicit BOS/EOS on encode, special tokens never skipped on decode,
and special-token strings inside documents encoded as ordinary text (a document that
mentions "<|endoftext|>" must not inject a separator into the token stream). Chat text is the
exception: what a chat template renders is encoded with its special tokens (`encode_chat`).
A trained BPE also reserves ChatML's `<|im_start|>`/`<|im_end|>`, so it gets the built-in chat
template; a loaded one gets the template saved beside its tokenizer.json (data/chat.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stagewise.data import chat, special_tokens
from stagewise.data.chat import ChatTemplate
from stagewise.data.special_tokens import SpecialTokens
from stagewise.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Reserved by every BPE stagewise trains (ids 0, 1, 2), so any of its models can be chat-tuned.
TRAINED_SPECIALS = (EOS_TOKEN, chat.IM_START, chat.IM_END)
# Tried in order when loading a tokenizer.json we did not train (GPT-2, T5/Llama-2, Gemma, Llama-3).
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """Text <-> token ids, plus the special tokens (`specials`: the document separator `eos_id`, the
    `bos_id` documents and prompts start with when `add_bos`, the sampling `stop_ids`) and a content
    hash (`sha256`, of tokenizer.json alone) and the `chat_template` (None if it has none)."""

    def __init__(self, tok: HFTokenizer, source: str = "tokenizer", specials: Optional[SpecialTokens] = None,
                 chat_template: Optional[ChatTemplate] = None):
        self._tok = tok
        self._tok.encode_special_tokens = True  # not serialized, so it does not change sha256
        self.specials = specials or SpecialTokens.default(_find_eos(tok, source))
        self.eos_id = self.specials.eos_id
        self.eos_token = tok.id_to_token(self.eos_id)
        self.bos_id, self.add_bos = self.specials.bos_id, self.specials.add_bos
        self.stop_ids = self.specials.stop_ids
        self.doc_prefix = self.specials.doc_prefix  # [bos_id] or []: what every document starts with
        if chat_template is None and chat.has_chatml_tokens(tok):
            chat_template = chat.chatml(self.template_tokens)
        self.chat_template = chat_template

    @property
    def template_tokens(self) -> dict[str, str]:
        """The special-token strings a chat template may refer to, as transformers names them."""
        out = {"eos_token": self.eos_token}
        if self.bos_id is not None:
            out["bos_token"] = self._tok.id_to_token(self.bos_id)
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def sha256(self) -> str:
        """Hash of the canonical (compact) JSON, so reformatting tokenizer.json does not change it."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for interop; prefer the methods here)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a generation prompt as a document starts: imported Gemma/Llama 3 tokenizers prepend
        their BOS, a byte-level BPE we trained adds nothing."""
        return self.doc_prefix + self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); much faster than a Python loop."""
        # encode_batch_fast skips offset tracking we never use; older tokenizers lack it.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_chat(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of text a chat template rendered: its special-token strings are
        their tokens, one id each, as transformers' apply_chat_template encodes them (documents
        never are, see `encode`). Nothing is prepended: a template writes its own bos."""
        enc = self._chat_tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @cached_property
    def _chat_tok(self) -> HFTokenizer:
        # A copy, so toggling special-token matching can never leak into document encoding
        # (another thread encoding a document mid-chat would otherwise inject separators).
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = False
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for (int64, length vocab_size); special tokens 0.

        This is what bits per byte divides by: summed over a token sequence it is the byte length
        of the text those tokens decode to, whatever the tokenizer. Three spellings of a token's
        bytes are recognised from the tokenizer's own JSON: byte-level BPE (GPT-2, Llama 3, Qwen:
        every character of the token string is one byte), SentencePiece-style (Llama 2, Gemma:
        U+2581 is a space, `<0xAB>` byte-fallback tokens are one byte) and plain text.
        """
        spec = json.loads(self._tok.to_str())
        byte_level = _uses(spec, "ByteLevel")
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        special = {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
        decode = {c: b for b, c in _byte_to_unicode().items()} if byte_level else None
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in special:
                continue
            if byte_fallback and _BYTE_PIECE.fullmatch(piece):
                out[i] = 1
            elif decode is not None and all(c in decode for c in piece):
                out[i] = len(piece)
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def save(self, path: str | Path) -> None:
        """tokenizer.json, and beside it the special-token choice when it is not stagewise's default
        and a chat template that is not the built-in, as chat_template.jinja (where transformers 5
        reads it from too)."""
        self._tok.save(str(path))
        if self.specials.origin:
            (Path(path).parent / special_tokens.SPECIALS_FILE).write_bytes(self.specials_json())
        # The built-in ChatML is never written: it follows from the vocabulary (like the default
        # special tokens), and a written copy would shadow an imported model's real template copied
        # in beside it later (tokenizer_config.json loses to chat_template.jinja).
        if self.chat_template is not None and not self.chat_template.builtin:
            chat.write_template(self.chat_template, Path(path).parent)

    def specials_json(self) -> bytes:
        return special_tokens.write_bytes(self.specials, self._tok)

    @classmethod
    def load(cls, path: str | Path, hf_config: Optional[dict] = None) -> "Tokenizer":
        """tokenizer.json, with the special tokens named beside it (data/special_tokens.py); `hf_config`
        stands in for a config.json the directory lacks (a GGUF import)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"tokenizer {path} is not a valid tokenizer.json ({first})") from None
        source = f"tokenizer {path}"
        out = cls(tok, source, special_tokens.resolve(tok, path.parent, lambda: _find_eos(tok, source), hf_config))
        out.chat_template = chat.read_template(path.parent, out.template_tokens) or out.chat_template
        return out

    def __repr__(self) -> str:
        bos = f", bos={self._tok.id_to_token(self.bos_id)!r}" if self.add_bos else ""
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}{bos}, sha256={self.sha256[:12]})"


def train_bpe(texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as ids 0, 1, 2.
    Deterministic for the same texts. split_digits: every digit a token of its own (a Digits
    pre-tokenizer before the byte-level one)."""
    if vocab_size < 256 + len(TRAINED_SPECIALS):
        raise DataError(f"data.tokenizer.vocab_size: {vocab_size} is too small; a byte-level BPE needs "
                        f"at least {256 + len(TRAINED_SPECIALS)} (256 bytes + {', '.join(TRAINED_SPECIALS)})")
    tok = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no space invented before the first word).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        # Seeding all 256 byte symbols guarantees any input is encodable, even bytes unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in TRAINED_SPECIALS] == list(range(len(TRAINED_SPECIALS)))
    return Tokenizer(tok, source="trained BPE")


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _uses(spec: dict, kind: str) -> bool:
    """Whether the tokenizer JSON's pre-tokenizer or decoder is (or contains) `kind`."""
    def walk(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == kind or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False
    return walk(spec.get("pre_tokenizer")) or walk(spec.get("decoder"))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _find_eos(tok: HFTokenizer, source: str) -> int:
    for name in EOS_CANDIDATES:
        i: Optional[int] = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"{source} has no end-of-text token to separate documents; "
                    f"expected one of {', '.join(EOS_CANDIDATES)}")
