"""Data: documents from sources -> tokenizer -> verified token files -> batches.

  sources.py    iter_documents(): text/JSONL/Parquet files and built-in corpora as Documents
  tokenizer.py  Tokenizer (wraps a HF tokenizers.Tokenizer) and train_bpe()
  shards.py     prepare_dataset() / resolve_dataset() write train.bin, val.bin, manifest.json;
                open_dataset() memory-maps and verifies them
  sampler.py    SequenceSampler (shuffled, resumable, rank-sharded) and eval_batches()
"""

from stagewise.data.sampler import SequenceSampler, eval_batches
from stagewise.data.shards import (
    TokenDataset,
    dataset_key,
    dtype_for_vocab,
    open_dataset,
    prepare_dataset,
    resolve_dataset,
)
from stagewise.data.sources import Document, iter_documents
from stagewise.data.tokenizer import Tokenizer, train_bpe

__all__ = [
    "Document",
    "SequenceSampler",
    "TokenDataset",
    "Tokenizer",
    "dataset_key",
    "dtype_for_vocab",
    "eval_batches",
    "iter_documents",
    "open_dataset",
    "prepare_dataset",
    "resolve_dataset",
    "train_bpe",
]
