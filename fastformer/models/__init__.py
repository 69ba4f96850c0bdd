"""Transformer models built from fastformer.nn: GPT, BERT, Seq2SeqTransformer, ViT, TimeSeriesTransformer."""

from .bert import BERT, BERTConfig, BERTOutput
from .gpt import GPT, GPTConfig
from .kv_cache import KVCache
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from .timeseries import TimeSeriesTransformer
from .vit import ViT

__all__ = [
    "BERT", "BERTConfig", "BERTOutput", "GPT", "GPTConfig", "KVCache", "Seq2SeqConfig", "Seq2SeqTransformer",
    "TimeSeriesTransformer", "ViT",
]
