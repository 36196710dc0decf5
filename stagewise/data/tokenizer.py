"""A thin wrapper over a Hugging Face `tokenizers.Tokenizer`: train a byte-level BPE or load a tokenizer.json.

Byte-level BPE (GPT-2 style) maps every UTF-8 byte to a printable symbol before merging,
so there is no unknown token and decode(encode(s)) == s for every Unicode string,
including whitespace runs in code. The wrapper fixes the few choices that matter for a
data pipeline: no implicit BOS/EOS on encode, special tokens never skipped on decode,
and special-token strings inside documents encoded as ordinary text (a document that
mentions "<|endoftext|>" must not inject a separator into the token stream).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stagewise.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Tried in order when loading a tokenizer.json we did not train (GPT-2, T5/Llama-2, Gemma, Llama-3).
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """Text <-> token ids, plus the document separator (`eos_id`) and a content hash (`sha256`)."""

    def __init__(self, tok: HFTokenizer, source: str = "tokenizer"):
        self._tok = tok
        self._tok.encode_special_tokens = True  # not serialized, so it does not change sha256
        self.eos_id = _find_eos(tok, source)
        self.eos_token = tok.id_to_token(self.eos_id)

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
        """Encode a generation prompt with the tokenizer's own special tokens (its post-processor):
        imported Gemma/Llama 3 tokenizers prepend their BOS, a byte-level BPE we trained adds nothing."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); much faster than a Python loop."""
        # encode_batch_fast skips offset tracking we never use; older tokenizers lack it.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"tokenizer {path} is not a valid tokenizer.json ({first})") from None
        return cls(tok, source=f"tokenizer {path}")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, sha256={self.sha256[:12]})"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as id 0. Deterministic for the same texts."""
    if vocab_size < 257:
        raise DataError(f"data.tokenizer.vocab_size: {vocab_size} is too small; a byte-level BPE needs "
                        "at least 257 (256 bytes + <|endoftext|>)")
    tok = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no space invented before the first word).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seeding all 256 byte symbols guarantees any input is encodable, even bytes unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS_TOKEN) == 0
    return Tokenizer(tok, source="trained BPE")


def _find_eos(tok: HFTokenizer, source: str) -> int:
    for name in EOS_CANDIDATES:
        i: Optional[int] = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"{source} has no end-of-text token to separate documents; "
                    f"expected one of {', '.join(EOS_CANDIDATES)}")
