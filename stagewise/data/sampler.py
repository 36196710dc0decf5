"""Batches of fixed-length windows from a flat token stream, resumable exactly.

The stream is cut into windows of seq_len + 1 tokens starting at multiples of seq_len:
window i is tokens[i*L : i*L + L + 1], input x = window[:-1], target y = window[1:].
Neighbouring windows share one boundary token, so every token after the first is a
target exactly once per full pass. Windows cross document boundaries; the EOS between
documents tells the model where one ends (as in GPT-2/nanoGPT pre-training).

Order is a pure function of (seed, epoch, index): the permutation of an epoch comes from
np.random.default_rng([seed, epoch]), so the sampler's whole state is two integers and a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from stagewise.data.batch import Batch
from stagewise.errors import DataError


def _windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def _gather(tokens: np.ndarray, seq_len: int, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    starts = np.asarray(window_ids, dtype=np.int64) * seq_len
    # Fancy indexing reads only the needed pages of a memmap; int64 because that is
    # what embedding lookups and cross-entropy targets take.
    w = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())


class SequenceSampler:
    """Shuffled (x, y) batches for one rank; ranks take disjoint strided slices of each epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        assert 0 <= rank < world_size, (rank, world_size)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_windows = _windows(tokens, seq_len)
        # Every rank gets the same number of windows (the remainder is left out of that
        # epoch) so all ranks step in lockstep and roll over to the next epoch together.
        per_rank = self.n_windows // world_size
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise DataError(f"data: training split has {len(tokens)} tokens = {self.n_windows} windows of "
                            f"data.seq_len+1 = {seq_len + 1}; one batch needs train.batch_size = {batch_size}"
                            f"{ranks}; lower data.seq_len or train.batch_size, or add data")
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            per_rank = self.batches_per_epoch * self.batch_size
            self._order = perm[self.rank::self.world_size][:per_rank]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each int64 [batch_size, seq_len], with y[:, t] the token after x[:, t]."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        ids = self._epoch_order()[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return _gather(self.tokens, self.seq_len, ids)

    def next(self) -> Batch:
        return Batch(*self.next_batch())

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """The position as a global cursor: windows of this epoch drawn by all ranks together, which
        stays meaningful when a resume changes the world size."""
        return {"epoch": int(self.epoch), "cursor": int(self.index) * self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch = state["epoch"]
            # "index" (batches of one rank) is the form checkpoints had before the global cursor
            cursor = state["cursor"] if "cursor" in state else state["index"] * self.batch_size
        except (KeyError, TypeError):
            raise DataError(f"sampler state {state!r} lacks 'epoch' and 'cursor'") from None
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and cursor >= 0):
            raise DataError(f"sampler state {state!r}: epoch and cursor must be non-negative integers")
        per_step = self.batch_size * self.world_size
        if cursor % per_step:
            raise DataError(f"sampler state {state!r}: cursor {cursor} is not a whole number of batches of "
                            f"{self.batch_size} x {self.world_size} ranks; resume with the batch size it was saved with")
        self.epoch, self.index = epoch, cursor // per_step


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[tuple]:
    """A fixed, evenly spaced set of validation windows as (x, y) batches of equal size.

    The same windows every evaluation, so successive validation losses are comparable.
    A small split gets fewer (or smaller) batches rather than repeated windows.
    """
    n = _windows(tokens, seq_len)
    if n == 0:
        raise DataError(f"data: validation split has {len(tokens)} tokens, fewer than data.seq_len+1 = "
                        f"{seq_len + 1}; lower data.seq_len or raise data.val_fraction")
    if n >= batch_size:
        bs, nb = batch_size, min(n_batches, n // batch_size)
    else:
        bs, nb = n, 1
    chosen = (np.arange(bs * nb, dtype=np.int64) * n) // (bs * nb)  # distinct, spread over the whole split
    return [_gather(tokens, seq_len, chosen[b * bs:(b + 1) * bs]) for b in range(nb)]
