"""The network: a Llama-family decoder (`llama`) and its parameter/FLOP/memory arithmetic (`flops`)."""

from stagewise.model.flops import estimate_memory, flops_per_token, param_counts
from stagewise.model.llama import KVCache, Transformer, document_positions, resolved_dims, validate_model_config

__all__ = ["KVCache", "Transformer", "document_positions", "estimate_memory", "flops_per_token", "param_counts",
           "resolved_dims", "validate_model_config"]
