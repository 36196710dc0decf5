"""SFT data: conversations from the recipe's sources -> token examples with a loss mask.

Each conversation is rendered with the tokenizer's chat template (data/chat.py) and turned
into one example: inputs = ids[:-1], targets = ids[1:] where the target token is trained
(assistant turns with their end-of-turn token by default), IGNORE_INDEX elsewhere. A
conversation longer than seq_len + 1 tokens is truncated, dropped or refused per
`sft.truncation`. Validation rows are chosen by a hash of their source and row, so they
never change with the order or number of other rows; the built-in sets bring their own split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np

from stagewise.config.post_training import ChatSourceConfig, SFTConfig
from stagewise.data.batch import IGNORE_INDEX
from stagewise.data.chat import ChatTemplate, require_template
from stagewise.data.conversations import Conversation, read_conversations
from stagewise.data.tokenizer import Tokenizer
from stagewise.errors import DataError


@dataclass
class Example:
    inputs: np.ndarray   # int64 [n]
    targets: np.ndarray  # int64 [n], IGNORE_INDEX where no loss is taken
    source: str          # "file:row" or the built-in item's id


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    val_conversations: list[Conversation]  # for exact-match generation (verifiable data)
    template: ChatTemplate
    stats: dict = field(default_factory=dict)  # conversations read, truncated, dropped per split


def conversations(sft: SFTConfig, where: str = "sft.data") -> Iterator[tuple[str, Conversation]]:
    """(split, conversation) of every source, in order."""
    for j, src in enumerate(sft.data):
        yield from _source(src, sft, f"{where}[{j}]")


def _source(src: ChatSourceConfig, sft: SFTConfig, where: str) -> Iterator[tuple[str, Conversation]]:
    if src.kind in ("python-docstrings", "arithmetic"):
        from stagewise.data.builtin_chat import builtin_conversations

        for item in builtin_conversations(src.kind, **_builtin_options(src.kind, sft)):
            extra = {k: v for k, v in item.items() if k not in ("messages", "split", "id")}
            yield item["split"], Conversation(item["messages"], f"{src.kind}:{item['id']}", False, extra)
        return
    for conv in read_conversations(src.path, src.glob, src.format, src.split, where=where):
        yield row_split(conv.source, sft.val_fraction), conv


def _builtin_options(kind: str, sft: SFTConfig) -> dict:
    if kind == "python-docstrings":
        return {"max_body_chars": sft.docstrings_max_body_chars}
    a = sft.arithmetic
    return {"train_count": a.train_count, "val_count": a.val_count, "ops": tuple(a.ops),
            "digits": (a.min_digits, a.max_digits), "fmt": a.format, "seed": a.seed}


def row_split(source: str, val_fraction: float) -> str:
    """"train" or "val" for a row named "file:row", by a hash of the name: the same row always lands in
    the same split, whatever else the file holds."""
    u = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def encode(tokenizer: Tokenizer, template: ChatTemplate, conv: Conversation, train_on: str) -> Example:
    """One conversation as an example; train_on: assistant, last or all (SFTConfig.train_on)."""
    ids, mask = template.encode(tokenizer, conv.messages, only_last=conv.completion_only or train_on == "last",
                                where=conv.source)
    ids = np.asarray(ids, dtype=np.int64)
    keep = np.ones(len(ids), dtype=bool) if train_on == "all" else np.asarray(mask, dtype=bool)
    targets = np.where(keep[1:], ids[1:], IGNORE_INDEX)
    return Example(ids[:-1], targets, conv.source)


def fit_length(ex: Example, seq_len: int, policy: str, what: str = "the conversation",
               section: str = "sft") -> Optional[Example]:
    """The example within seq_len tokens per `policy` (truncate / drop / error); None when dropped or
    when truncation leaves nothing to train on. what / section name it in the error (the <section>.truncation
    key decides)."""
    if len(ex.inputs) <= seq_len:
        return ex
    if policy == "error":
        raise DataError(f"{ex.source}: {what} is {len(ex.inputs) + 1} tokens, longer than data.seq_len + 1 "
                        f"= {seq_len + 1}; raise data.seq_len or set {section}.truncation to truncate or drop")
    if policy == "drop":
        return None
    cut = Example(ex.inputs[:seq_len], ex.targets[:seq_len], ex.source)
    return cut if (cut.targets != IGNORE_INDEX).any() else None


def load_sft_data(sft: SFTConfig, tokenizer: Tokenizer, seq_len: int, where: str = "sft", log=print) -> SFTData:
    """Every conversation of the stage encoded, split and fitted to seq_len; DataError (one line naming the
    row) for bad rows, a template that fails, or a split left empty."""
    template = require_template(tokenizer, f"{where}: the tokenizer")
    out = {"train": [], "val": []}
    val_convs, stats = [], {"train": [0, 0, 0], "val": [0, 0, 0]}  # read, truncated, dropped
    for split, conv in conversations(sft, f"{where}.data"):
        ex = encode(tokenizer, template, conv, sft.train_on)
        fitted = fit_length(ex, seq_len, sft.truncation)
        stats[split][0] += 1
        stats[split][1] += fitted is not None and len(fitted.inputs) < len(ex.inputs)
        stats[split][2] += fitted is None
        if fitted is not None:
            out[split].append(fitted)
            if split == "val":
                val_convs.append(conv)
    for split in ("train", "val"):
        if not out[split]:
            raise DataError(f"{where}.data: no {split} examples left ({stats[split][0]} read, {stats[split][2]} "
                            f"dropped as longer than data.seq_len={seq_len}); add data, raise data.seq_len or "
                            f"sft.val_fraction")
    named = {s: dict(zip(("conversations", "truncated", "dropped"), v)) for s, v in stats.items()}
    log(f"{where}: {len(out['train'])} train / {len(out['val'])} val examples "
        f"(truncated {named['train']['truncated']}, dropped {named['train']['dropped']} over {seq_len} tokens)")
    return SFTData(out["train"], out["val"], val_convs, template, named)


def lengths(examples: Iterable[Example]) -> np.ndarray:
    return np.asarray([len(e.inputs) for e in examples], dtype=np.int64)
