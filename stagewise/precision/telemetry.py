"""What a low-precision format does to gradients and updates, measured cheaply.

Two measurements, both defined in docs/precision.md and tested on hand-built tensors:

GradFormatStats — for each weight matrix, a strided sample of at most SAMPLE elements of the
gradient g as computed in fp32 (for fp16-mixed: multiplied by the loss scale, i.e. the value
fp16 storage has to hold) is rounded to the gradient format F (round to nearest even) and
compared with itself:
    flushed    g != 0 and F(g) == 0                 (underflow: the format made it zero)
    subnormal  F(g) != 0 and |F(g)| < finfo(F).tiny  (kept, but with fewer mantissa bits)
    overflow   g finite and F(g) infinite
    nonfinite  g already inf/NaN
Fractions are over all sampled elements of all layers (element-weighted).

LostUpdate — for weights stored in a low-precision format, the update arithmetic intends
u = w_new_exact - w_before (computed in fp32), but storage keeps w_after = round(w_new_exact):
    lost_update_frac = ||(w_after - w_before) - u||_2 / ||u||_2   over all parameters.
0 means every update landed; 1 means none did (e.g. updates below half an ulp of the weight).
"""

from __future__ import annotations

import math

import torch

SAMPLE = 4096  # elements per layer; a strided sample covers every row of a matrix cheaply


def _sample(g: torch.Tensor) -> torch.Tensor:
    flat = g.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // SAMPLE))  # ceil: at most SAMPLE elements
    return flat[::stride].float()


class GradFormatStats:
    def __init__(self, fmt: torch.dtype):
        self.fmt = fmt
        self.tiny = torch.finfo(fmt).tiny
        self.layers: dict[str, list[int]] = {}  # name -> [sampled, flushed, subnormal, overflow, nonfinite]

    def add(self, name: str, grad: torch.Tensor) -> None:
        g = _sample(grad)
        r = g.to(self.fmt).float()
        finite = torch.isfinite(g)
        counts = [g.numel(),
                  int(((g != 0) & (r == 0)).sum()),
                  int(((r != 0) & (r.abs() < self.tiny)).sum()),
                  int((finite & ~torch.isfinite(r)).sum()),
                  int((~finite).sum())]
        acc = self.layers.setdefault(name, [0] * 5)
        for i, c in enumerate(counts):
            acc[i] += c

    def summary(self) -> dict:
        if not self.layers:
            return {}
        tot = [sum(v[i] for v in self.layers.values()) for i in range(5)]
        n = max(tot[0], 1)
        worst = max(self.layers, key=lambda k: (self.layers[k][1] + self.layers[k][2]) / max(self.layers[k][0], 1))
        w = self.layers[worst]
        return {"grad_format": str(self.fmt).removeprefix("torch."), "grad_sampled": tot[0],
                "grad_flushed_frac": tot[1] / n, "grad_subnormal_frac": tot[2] / n,
                "grad_overflow": tot[3], "grad_nonfinite": tot[4],
                "grad_worst_layer": worst, "grad_worst_layer_frac": (w[1] + w[2]) / max(w[0], 1)}


class LostUpdate:
    def __init__(self):
        self.err2 = 0.0
        self.ref2 = 0.0

    def add(self, before: torch.Tensor, after: torch.Tensor, intended: torch.Tensor) -> None:
        intended = intended.double()
        err = (after.double() - before.double()) - intended
        self.err2 += float(err.square().sum())
        self.ref2 += float(intended.square().sum())

    def value(self) -> float | None:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else None
