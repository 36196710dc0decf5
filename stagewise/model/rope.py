"""Rotary position embeddings (Su et al. 2021) in the split-halves layout of HF Llama.

Dimension i rotates with i + head_dim/2 (`rotate_half`), so Hugging Face q/k projection rows load
without permutation. Frequency scaling for long context is applied to the inverse frequencies:
  * linear  positions are divided by `factor` (position interpolation, Chen et al. 2023);
  * llama3  Llama 3.1's rule: high frequencies (wavelength < original/high_freq_factor) are kept,
            low ones (wavelength > original/low_freq_factor) divided by `factor`, and the band
            between interpolated smoothly. Written exactly as transformers computes it, in fp32,
            so imported Llama 3.x checkpoints reproduce its logits.
"""

from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, base: float, scaling=None) -> torch.Tensor:
    """[head_dim/2] fp32 inverse frequencies; `scaling` is a RopeScalingConfig or None."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    kind = getattr(scaling, "kind", "none")
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind == "llama3":
        factor, old_len = scaling.factor, scaling.original_max_seq_len
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(head_dim: int, max_len: int, base: float, scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in fp32, frequencies repeated over the two halves (HF layout)."""
    inv_freq = inv_frequencies(head_dim, base, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x [B, heads, T, d] by the angles in cos/sin [T, d], or [B, T, d]
    per row (packed sequences, whose positions restart in every document)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    # Tables are fp32; casting them (not x) keeps bf16 activations bf16 instead of promoting.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
