"""Sampling from a trained model."""

from stagewise.generate.sampling import filter_logits, generate

__all__ = ["filter_logits", "generate"]
