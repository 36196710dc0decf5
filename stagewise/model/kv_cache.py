"""The key/value cache of cached decoding (Transformer.forward(cache=...), generate/engine.py)."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys/values per layer, [B, n_kv_heads, max_len, head_dim], filled left to right.

    `pos` is the number of positions already written; `Transformer.forward` writes the new chunk at
    [pos, pos + T) in every layer and then advances `pos` by T.

    `pad` [B] (int64, optional) is the number of left-padding slots of each row (a batch of prompts
    of different lengths, right-aligned): row b's token in slot j sits at RoPE position j - pad[b],
    and no query attends to a row's padding slots (stagewise/generate/engine.py).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0
        self.pad: torch.Tensor | None = None
        # Static decoding (Transformer.decode_step): writes at the slot in pos_t, attends to every slot.
        self.pos_t: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch), in that order: finished rows leave the batch."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)

    @classmethod
    def for_model(cls, model, batch_size: int = 1, max_len: int | None = None) -> "KVCache":
        p = model.tok_embeddings.weight
        return cls(model.cfg.n_layers, batch_size, model.n_kv_heads, max_len or model.cfg.max_seq_len,
                   model.head_dim, dtype=p.dtype, device=p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's k/v for `layer`; return all keys/values so far (views, no copy). Static
        decoding writes one token at slot pos_t and returns every slot (the mask hides the rest)."""
        if self.pos_t is not None:
            self.k[layer].index_copy_(2, self.pos_t, k)
            self.v[layer].index_copy_(2, self.pos_t, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
