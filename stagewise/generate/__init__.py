"""Sampling from a trained model: the batched engine (engine.py) and its one-prompt form."""

from stagewise.generate.engine import Generation, generate_batch
from stagewise.generate.sampling import filter_logits, generate

__all__ = ["Generation", "filter_logits", "generate", "generate_batch"]
