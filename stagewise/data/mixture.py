"""Batches mixed from several domains in fixed proportions, resumable exactly.

Each domain is its own prepared dataset with its own `SequenceSampler` (batch size 1), so
a domain's position survives across stages: replaying an earlier domain continues where
that domain's training stopped instead of re-reading its first windows.

Which domain supplies each sequence is decided by smooth weighted round-robin (the credit
scheme of nginx's upstream balancer): before every sequence each domain gains its
probability as credit, the domain with the most credit (ties to the earlier one) supplies
the sequence and pays 1. No RNG is involved, and after n sequences every domain's count
is within a small constant of p * n (test_continual checks |realised - p| * n < number of
domains), so even a 1% replay share is exact over a few hundred sequences instead of
drifting like a Bernoulli draw. The whole state is the credits, the counts and the child
samplers' (epoch, index): plain JSON for the checkpoint.
"""

from __future__ import annotations

import torch

from stagewise.data.batch import Batch
from stagewise.data.sampler import SequenceSampler
from stagewise.errors import DataError


class MixtureSampler:
    def __init__(self, samplers: dict[str, SequenceSampler], probs: dict[str, float], batch_size: int,
                 stage: int = 0, replayed: tuple[str, ...] = ()):
        assert set(probs) <= set(samplers) and abs(sum(probs.values()) - 1.0) < 1e-9, probs
        self.samplers, self.batch_size, self.stage, self.replayed = samplers, batch_size, stage, replayed
        self.names = [n for n in samplers if probs.get(n, 0.0) > 0]
        self.probs = {n: probs[n] for n in self.names}
        self.credit = {n: 0.0 for n in self.names}
        self.counts = {n: 0 for n in self.names}
        self.carried: dict[str, dict] = {}  # positions of domains this stage does not draw from

    def _pick(self) -> str:
        for n in self.names:
            self.credit[n] += self.probs[n]
        best = max(self.names, key=lambda n: self.credit[n])  # max() keeps the first of equals
        self.credit[best] -= 1.0
        self.counts[best] += 1
        return best

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(self.batch_size):
            x, y = self.samplers[self._pick()].next_batch()
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def next(self) -> Batch:
        return Batch(*self.next_batch())

    def metrics(self) -> dict:
        """mix/<domain>: realised share of each domain; replay: the share of the replayed domains."""
        shares = self.fractions()
        out = {f"mix/{n}": v for n, v in shares.items()}
        if self.replayed:
            out["replay"] = sum(shares[n] for n in self.replayed)
        return out

    def fractions(self) -> dict[str, float]:
        """Realised share of each domain among the sequences drawn so far in this stage."""
        total = sum(self.counts.values())
        return {n: (c / total if total else 0.0) for n, c in self.counts.items()}

    def state_dict(self) -> dict:
        domains = {**self.carried, **{n: s.state_dict() for n, s in self.samplers.items()}}
        return {"stage": self.stage, "credit": dict(self.credit), "counts": dict(self.counts), "domains": domains}

    def load_state_dict(self, state: dict) -> None:
        """A state from this stage restores everything; one from an earlier stage (the boundary
        checkpoint) only the domains' positions: credits and counts start at zero."""
        if not isinstance(state, dict) or not isinstance(state.get("domains"), dict):
            raise DataError(f"mixture sampler state lacks 'domains' (a checkpoint of a run without stages?): "
                            f"{str(state)[:80]}")
        for name, pos in state["domains"].items():
            if name in self.samplers:
                self.samplers[name].load_state_dict(pos)
            else:
                self.carried[name] = pos
        if state.get("stage") == self.stage:
            if set(state["credit"]) != set(self.names):
                raise DataError(f"mixture sampler state has domains {sorted(state['credit'])}, this stage draws "
                                f"from {sorted(self.names)}")
            self.credit = {n: float(state["credit"][n]) for n in self.names}
            self.counts = {n: int(state["counts"][n]) for n in self.names}
