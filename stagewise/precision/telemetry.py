"""What a low-precision format does to gradients and updates, measured cheaply.

Three measurements, all defined in docs/precision.md and tested on hand-built tensors:

GradFormatStats — for each sampled tensor (a weight gradient, or an activation gradient at one
probe of act_grads.py), a strided sample of at most SAMPLE elements of the gradient g as it
reaches the storage (for fp16-mixed: multiplied by the loss scale, i.e. the value fp16 storage
has to hold) is rounded to the gradient format F (round to nearest even) and compared with itself:
    flushed    g != 0 and F(g) == 0                 (underflow: the format made it zero here)
    subnormal  F(g) != 0 and |F(g)| < finfo(F).tiny  (kept, but with fewer mantissa bits)
    overflow   g finite and F(g) infinite
    nonfinite  g already inf/NaN
and, where a reference sample is given (the support: where a well-scaled backward carries a
nonzero gradient, see act_grads.py):
    lost       support and F(g) == 0                 (zero here, whether flushed here or upstream)
Fractions are over all sampled elements of all layers (element-weighted); lost is over the support.

LostUpdate — for weights stored in a low-precision format, the update arithmetic intends
u = AdamW's step + weight decay (fp32), while the stored state moves the effective weight ŵ
(w, or w + c with a Kahan compensation buffer c) by Δ = ŵ_after - ŵ_before:
    lost_update_frac       = ||Δ - u||_2 / ||u||_2           over all parameters
    lost_update_along_frac = 1 - <Δ, u> / ||u||_2^2
0 means every update landed; 1 (both) means none did (e.g. updates below half an ulp of the
weight). Stochastic rounding makes the first large (each step lands 0 or a whole ulp) and keeps
the second near 0 (unbiased); the second is negative when more than u landed.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 4096  # elements per tensor; a strided sample covers every row of a matrix cheaply
_FIELDS = ("sampled", "flushed", "subnormal", "overflow", "nonfinite", "support", "lost")


def sample(g: torch.Tensor) -> torch.Tensor:
    """Every ceil(n / SAMPLE)-th element of g, as fp32: at most SAMPLE elements."""
    flat = g.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // SAMPLE))  # ceil: at most SAMPLE elements
    return flat[::stride].float()


class GradFormatStats:
    def __init__(self, fmt: torch.dtype):
        self.fmt = fmt
        self.tiny = torch.finfo(fmt).tiny
        self.layers: dict[str, list[int]] = {}  # name -> counts in _FIELDS order
        self.has_reference = False

    def add(self, name: str, grad: torch.Tensor, support: torch.Tensor | None = None) -> None:
        """Count one tensor; `support` (bool, the same strided sample of a tensor of the same shape)
        marks the elements a reference backward carries as nonzero."""
        g = sample(grad)
        r = g.to(self.fmt).float()
        finite = torch.isfinite(g)
        counts = [g.numel(),
                  int(((g != 0) & (r == 0)).sum()),
                  int(((r != 0) & (r.abs() < self.tiny)).sum()),
                  int((finite & ~torch.isfinite(r)).sum()),
                  int((~finite).sum()), 0, 0]
        if support is not None:
            self.has_reference = True
            counts[5] = int(support.sum())
            counts[6] = int((support & (r == 0)).sum())
        acc = self.layers.setdefault(name, [0] * len(_FIELDS))
        for i, c in enumerate(counts):
            acc[i] += c

    def _frac(self, v: list[int]) -> float:
        """The fraction a layer is ranked by: lost / support with a reference, else (flushed + subnormal) / n."""
        if self.has_reference:
            return v[6] / v[5] if v[5] else 0.0
        return (v[1] + v[2]) / max(v[0], 1)

    def summary(self, prefix: str = "grad", per_layer: bool = False) -> dict:
        if not self.layers:
            return {}
        tot = [sum(v[i] for v in self.layers.values()) for i in range(len(_FIELDS))]
        n = max(tot[0], 1)
        worst = max(self.layers, key=lambda k: self._frac(self.layers[k]))
        out = {"grad_format": str(self.fmt).removeprefix("torch."), f"{prefix}_sampled": tot[0],
               f"{prefix}_flushed_frac": tot[1] / n, f"{prefix}_subnormal_frac": tot[2] / n,
               f"{prefix}_overflow": tot[3], f"{prefix}_nonfinite": tot[4]}
        if self.has_reference:
            out[f"{prefix}_lost_frac"] = tot[6] / tot[5] if tot[5] else 0.0
        out[f"{prefix}_worst_layer"] = worst
        out[f"{prefix}_worst_layer_frac"] = self._frac(self.layers[worst])
        if per_layer:
            out[f"{prefix}_layers"] = {k: self._layer(v) for k, v in self.layers.items()}
        return out

    def _layer(self, v: list[int]) -> dict:
        n = max(v[0], 1)
        d = {"sampled": v[0], "flushed_frac": v[1] / n, "subnormal_frac": v[2] / n}
        if self.has_reference:
            d["lost_frac"] = v[6] / v[5] if v[5] else 0.0
        return d


class LostUpdate:
    def __init__(self):
        self.err2 = 0.0   # ||Δ - u||²
        self.ref2 = 0.0   # ||u||²
        self.dot = 0.0    # <Δ, u>

    def add(self, before: torch.Tensor, after: torch.Tensor, intended: torch.Tensor) -> None:
        """before/after: the effective weight (w, or w + c with Kahan) around one update; intended: u."""
        intended = intended.double()
        moved = after.double() - before.double()
        self.err2 += float((moved - intended).square().sum())
        self.ref2 += float(intended.square().sum())
        self.dot += float((moved * intended).sum())

    def value(self) -> float | None:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else None

    def along(self) -> float | None:
        return 1.0 - self.dot / self.ref2 if self.ref2 > 0 else None
