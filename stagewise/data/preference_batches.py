"""Preference batches: encoded units (data/preference.py) -> packed or padded `Batch`es.

Batches (`Batch` with seq_ids and labels): sequence 2u and 2u + 1 of a micro-batch are unit u's;
seq_ids [B, T] names the sequence of every trained target token (-1 elsewhere); labels [U] is
1.0 for a pair or a desirable example, 0.0 for an undesirable one; target_rows lists the trained
positions (computed here, on the CPU, so the step never waits for the device to find them), the
only rows the output head scores. Packed: whole units are put
into train.batch_size rows of data.seq_len tokens (each sequence its own document: attention and
positions as SFT packing); padded: a micro-batch is train.batch_size units, one sequence per row.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from stagewise.data.batch import IGNORE_INDEX, Batch
from stagewise.data.preference import Unit
from stagewise.errors import DataError

PAD_MULTIPLE = 32


def _batch(units: Sequence[Unit], rows: list[list[tuple[int, int]]], width: int, pad_id: int,
           ref: Optional[np.ndarray], index: Sequence[int], packed: bool) -> Batch:
    """rows: per row, (unit position in `units`, which sequence 0/1), laid out left to right."""
    n = len(rows)
    inputs = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    seq_ids = np.full((n, width), -1, dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    doc_ids = np.zeros((n, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for d, (u, s) in enumerate(row):
            ex = units[u].seqs[s]
            k = len(ex.inputs)
            inputs[r, at:at + k], targets[r, at:at + k] = ex.inputs, ex.targets
            seq_ids[r, at:at + k] = np.where(ex.targets != IGNORE_INDEX, 2 * u + s, -1)
            positions[r, at:at + k], doc_ids[r, at:at + k] = np.arange(k), d
            at += k
        positions[r, at:], doc_ids[r, at:] = np.arange(width - at), len(row)
    labels = torch.tensor([u.label for u in units], dtype=torch.float32)
    fields = {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
              "seq_ids": torch.from_numpy(seq_ids), "labels": labels,
              "target_rows": torch.from_numpy(np.flatnonzero(seq_ids.reshape(-1) >= 0))}
    if packed:
        fields |= {"positions": torch.from_numpy(positions), "doc_ids": torch.from_numpy(doc_ids)}
    if ref is not None:
        fields["ref_logprobs"] = torch.from_numpy(np.ascontiguousarray(ref[list(index)].reshape(-1)))
    return Batch(**fields)


def padded_batch(units: Sequence[Unit], seq_len: int, pad_id: int, ref=None, index=None) -> Batch:
    """One sequence per row (sequence 2u + s in row 2u + s), padded to the longest rounded up to 32."""
    longest = max(max(u.lengths()) for u in units)
    width = min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    rows = [[(u, s)] for u in range(len(units)) for s in (0, 1)]
    return _batch(units, rows, width, pad_id, ref, index if index is not None else range(len(units)), False)


def pack_units(lengths: Sequence[tuple[int, int]], order: Sequence[int], rows: int, seq_len: int) -> list:
    """Micro-batches of whole units, in `order`: each is (unit indices, per row [(unit slot, sequence)]).
    A unit's two sequences go best-fit into the rows' room; a unit that no longer fits closes the batch."""
    batches, cur, room, layout = [], [], [seq_len] * rows, [[] for _ in range(rows)]
    for i in order:
        placed = _place(lengths[i], room)
        if placed is None:
            batches.append((cur, layout))
            cur, room, layout = [], [seq_len] * rows, [[] for _ in range(rows)]
            placed = _place(lengths[i], room)
            assert placed is not None, (lengths[i], rows, seq_len)
        for s, r in enumerate(placed):
            layout[r].append((len(cur), s))
        cur.append(i)
    if cur:
        batches.append((cur, layout))
    return batches


def _place(lens: tuple[int, int], room: list[int]) -> Optional[list[int]]:
    """Rows (best fit) for both sequences, room updated; None (room unchanged) if they do not fit."""
    trial, placed = list(room), []
    for n in lens:
        fits = [r for r in range(len(trial)) if trial[r] >= n]
        if not fits:
            return None
        r = min(fits, key=lambda k: (trial[k], k))
        trial[r] -= n
        placed.append(r)
    room[:] = trial
    return placed


class PreferenceSource:
    """Training micro-batches of units, laid out per epoch from (seed, epoch), so they resume exactly.
    ref: [n_units, 2] precomputed reference log-probs (set before training), or None."""

    def __init__(self, units: list[Unit], seq_len: int, batch_size: int, seed: int, pad_id: int, packed: bool,
                 stage: int = 0, what: str = "dpo"):
        self.units, self.seq_len, self.batch_size, self.seed = units, seq_len, batch_size, seed
        self.pad_id, self.packed, self.stage = pad_id, packed, stage
        self.lengths = [u.lengths() for u in units]
        self.ref = None
        self.epoch, self.cursor, self.carried = 0, 0, {}
        self._layout_epoch, self._layout = -1, []
        if packed and any(a + b > seq_len for a, b in self.lengths) and batch_size < 2:
            raise DataError(f"{what}: a pair longer than data.seq_len = {seq_len} in total needs two rows; with "
                            "dpo.packing set train.batch_size >= 2 (rows per micro-batch)")
        if not packed and len(units) < batch_size:
            raise DataError(f"{what}: {len(units)} training units make fewer than train.batch_size = {batch_size} "
                            "per micro-batch; lower train.batch_size or add data")

    def _epoch_layout(self) -> list:
        if self._layout_epoch != self.epoch:
            order = [int(i) for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.units))]
            if self.packed:
                self._layout = pack_units(self.lengths, order, self.batch_size, self.seq_len)
            else:
                n = len(order) // self.batch_size
                self._layout = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(n)]
            self._layout_epoch = self.epoch
        return self._layout

    def _make(self, entry) -> Batch:
        if self.packed:
            index, rows = entry
            units = [self.units[i] for i in index]
            return _batch(units, rows, self.seq_len, self.pad_id, self.ref, index, True)
        return padded_batch([self.units[i] for i in entry], self.seq_len, self.pad_id, self.ref, entry)

    def next(self) -> Batch:
        layout = self._epoch_layout()
        if self.cursor >= len(layout):
            self.epoch, self.cursor = self.epoch + 1, 0
            layout = self._epoch_layout()
        batch = self._make(layout[self.cursor])
        self.cursor += 1
        return batch

    def padding_fraction(self) -> float:
        """Share of epoch 0's batch tokens that are padding."""
        saved = (self.epoch, self._layout_epoch, self._layout)
        self.epoch = 0
        layout = self._epoch_layout()
        total = real = 0
        for entry in layout:
            b = self._make(entry)
            total += b.inputs.numel()
            index = entry[0] if self.packed else entry
            real += sum(sum(self.lengths[i]) for i in index)
        self.epoch, self._layout_epoch, self._layout = saved
        return 1.0 - real / max(total, 1)

    def metrics(self) -> dict:
        return {"epoch": self.epoch}

    def state_dict(self) -> dict:
        return {"kind": "dpo", "stage": self.stage, "epoch": self.epoch, "cursor": self.cursor, "domains": self.carried}

    def load_state_dict(self, state: dict) -> None:
        """Its own state restores the position; another stage's only passes its domain positions on."""
        if not isinstance(state, dict):
            raise DataError(f"dpo source state: expected a dict, got {str(state)[:80]}")
        self.carried = dict(state.get("domains") or {})
        if state.get("kind") == "dpo" and state.get("stage") == self.stage:
            epoch, cursor = state.get("epoch"), state.get("cursor")
            if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and cursor >= 0):
                raise DataError(f"dpo source state {state!r}: epoch and cursor must be non-negative integers")
            self.epoch, self.cursor = epoch, cursor


def eval_batches(units: list[Unit], seq_len: int, batch_size: int, n_batches: int, pad_id: int,
                 ref=None, offset: int = 0) -> list[Batch]:
    """A fixed validation set: the first n_batches * batch_size units, padded, in order. ref: the
    precomputed table whose rows offset.. are these units'."""
    units = units[:batch_size * n_batches]
    return [padded_batch(units[k:k + batch_size], seq_len, pad_id, ref,
                         range(offset + k, offset + min(k + batch_size, len(units))))
            for k in range(0, len(units), batch_size)]
