"""Data: tokenizers, Megatron indexed-dataset preparation, global-index datasets and per-rank batching."""
