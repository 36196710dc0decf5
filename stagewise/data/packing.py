"""SFT batch sources: packed rows (best-fit-decreasing) or padded, length-grouped batches.

Packing puts several examples into one row of exactly seq_len tokens. Each epoch the examples
are shuffled and packed best-fit-decreasing (longest first, each into the fullest row it still
fits; Johnson 1973's BFD uses at most 11/9 OPT + 1 rows), then the rows are shuffled. A row's
`doc_ids` keep attention inside each example and its `positions` restart at 0 per example,
so a packed example's logits equal those of the example alone (model/llama.py); the tail of a
row is padding, a document of its own that takes no loss.

Without packing every example gets its own row: batches are formed from examples of similar
length (sorted within shuffled windows of 64 batches, then the batches shuffled) and padded to
their longest example rounded up to a multiple of 32, which bounds both the waste and the
number of shapes a compiled model sees.

Both sources' positions are a global cursor (rows drawn this epoch), so they resume exactly
and stay meaningful when the world size changes.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.data.sft_data import Example
from stagewise.errors import DataError

PAD_MULTIPLE = 32
GROUP_BATCHES = 64


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity. Items are taken longest first (ties in
    the given order) and each goes into the bin with the least room left that still holds it."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        assert 0 < n <= capacity, (n, capacity)
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


def packed_row(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One row: the examples back to back, then padding (its own document, no loss)."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    doc_ids = np.full(seq_len, len(examples), dtype=np.int64)
    at = 0
    for d, ex in enumerate(examples):
        n = len(ex.inputs)
        inputs[at:at + n], targets[at:at + n] = ex.inputs, ex.targets
        positions[at:at + n], doc_ids[at:at + n] = np.arange(n), d
        at += n
    positions[at:] = np.arange(seq_len - at)
    return {"inputs": inputs, "targets": targets, "positions": positions, "doc_ids": doc_ids}


def _stack(rows: list[dict]) -> Batch:
    return Batch(**{k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]})


class _EpochSource:
    """Rows of an epoch laid out from (seed, epoch), drawn batch_size at a time."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 stage: int = 0, what: str = "sft"):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.pad_id, self.stage = seed, pad_id, stage
        self.lengths = [len(e.inputs) for e in examples]
        self.epoch, self.cursor, self.carried = 0, 0, {}
        self._layout_epoch, self._layout = -1, []
        if len(self._epoch_layout()) == 0:
            raise DataError(f"{what}: {len(examples)} training examples make fewer than train.batch_size = "
                            f"{batch_size} rows; lower train.batch_size or add data")

    def _epoch_layout(self) -> list:
        if self._layout_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._layout = self._lay_out(rng)
            self._layout_epoch = self.epoch
        return self._layout

    def next(self) -> Batch:
        layout = self._epoch_layout()
        if self.cursor + 1 > len(layout):
            self.epoch, self.cursor = self.epoch + 1, 0
            layout = self._epoch_layout()
        batch = self._batch(layout[self.cursor])
        self.cursor += 1
        return batch

    def padding_fraction(self) -> float:
        """Share of the tokens of an epoch's batches that are padding (epoch 0's layout)."""
        real = sum(self.lengths[i] for group in self._lay_out(np.random.default_rng([self.seed, 0])) for row in
                   self._rows(group) for i in row)
        return 1.0 - real / max(1, self._epoch_tokens())

    def metrics(self) -> dict:
        return {"epoch": self.epoch}

    def state_dict(self) -> dict:
        return {"kind": "sft", "stage": self.stage, "epoch": self.epoch, "cursor": self.cursor * self.batch_size,
                "domains": self.carried}  # cursor: rows drawn this epoch

    def load_state_dict(self, state: dict) -> None:
        """Its own state restores the position; another stage's (the boundary checkpoint) only passes
        its domain positions on, so that a later pre-training stage continues where it was."""
        if not isinstance(state, dict):
            raise DataError(f"sft source state: expected a dict, got {str(state)[:80]}")
        self.carried = dict(state.get("domains") or {})
        if state.get("kind") == "sft" and state.get("stage") == self.stage:
            epoch, cursor = state.get("epoch"), state.get("cursor")
            if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and cursor >= 0) \
                    or cursor % self.batch_size:
                raise DataError(f"sft source state {state!r}: epoch and cursor must be non-negative integers, the "
                                f"cursor a multiple of train.batch_size = {self.batch_size}")
            self.epoch, self.cursor = epoch, cursor // self.batch_size


class PackedSource(_EpochSource):
    def _lay_out(self, rng) -> list:
        perm = rng.permutation(len(self.examples))
        rows = [[int(perm[i]) for i in b] for b in best_fit_decreasing([self.lengths[i] for i in perm], self.seq_len)]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        n = len(rows) // self.batch_size
        return [rows[k * self.batch_size:(k + 1) * self.batch_size] for k in range(n)]

    def _rows(self, group):
        return group

    def _epoch_tokens(self) -> int:
        return len(self._epoch_layout()) * self.batch_size * self.seq_len

    def _batch(self, group) -> Batch:
        return _stack([packed_row([self.examples[i] for i in row], self.seq_len, self.pad_id) for row in group])


class PaddedSource(_EpochSource):
    def _lay_out(self, rng) -> list:
        perm = [int(i) for i in rng.permutation(len(self.examples))]
        window = self.batch_size * GROUP_BATCHES
        batches = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w:w + window], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk) - self.batch_size + 1,
                                                                    self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _rows(self, group):
        return [[i] for i in group]

    def _width(self, group) -> int:
        longest = max(self.lengths[i] for i in group)
        return min(self.seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)

    def _epoch_tokens(self) -> int:
        return sum(self._width(g) * len(g) for g in self._lay_out(np.random.default_rng([self.seed, 0])))

    def _batch(self, group) -> Batch:
        T = self._width(group)
        rows = []
        for i in group:
            ex = self.examples[i]
            n = len(ex.inputs)
            inputs = np.full(T, self.pad_id, dtype=np.int64)
            targets = np.full(T, IGNORE_INDEX, dtype=np.int64)
            inputs[:n], targets[:n] = ex.inputs, ex.targets
            rows.append({"inputs": inputs, "targets": targets})  # causal attention: the padding comes last
        return _stack(rows)


def eval_rows(examples: list[Example], seq_len: int, batch_size: int, n_batches: int, pad_id: int) -> list[Batch]:
    """A fixed validation set: the examples in order, packed first-fit into at most n_batches batches."""
    rows, row, used = [], [], 0
    for ex in examples:
        n = len(ex.inputs)
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
            if len(rows) == batch_size * n_batches:
                break
        row.append(ex)
        used += n
    if row and len(rows) < batch_size * n_batches:
        rows.append(row)
    packed = [packed_row(r, seq_len, pad_id) for r in rows]
    return [_stack(packed[k:k + batch_size]) for k in range(0, len(packed), batch_size)]
