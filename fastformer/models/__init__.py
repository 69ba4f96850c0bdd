"""Transformer models built from fastformer.nn: GPT, BERT, Seq2SeqTransformer, ViT, TimeSeriesTransformer."""

from .bert import BERT, BERTConfig, BERTOutput
from .gpt import GPT, GPTConfig
from .kv_cache import KVCache
from .vit import ViT

__all__ = ["BERT", "BERTConfig", "BERTOutput", "GPT", "GPTConfig", "KVCache", "ViT"]
