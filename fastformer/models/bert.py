"""BERT: a bidirectional encoder with learned positions, token types, padding
masks, a masked-language-model head and a pooled [CLS] output.

Post-norm layers as the original (``norm_first=False``); attention runs through
:func:`fastformer.scaled_dot_product_attention` with the padding mask as a
``(B, 1, 1, S)`` bool view (never expanded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..nn import Block, LayerNorm


@dataclass
class BERTConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0
    mlm_head: bool = True  # masked-LM head, decoder tied to the word embeddings
    pooler: bool = True
    use_checkpoint: bool = False


class BERTOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, S, hidden)
    pooler_output: Optional[Tensor]  # (B, hidden): tanh(W · h[CLS])
    logits: Optional[Tensor]  # (B, S, vocab) from the MLM head
    loss: Optional[Tensor]  # MLM cross-entropy over labels != -100


# torch.export.save needs a stable serialized name for the output's pytree node.
torch.utils._pytree._register_namedtuple(BERTOutput, serialized_type_name="fastformer.models.bert.BERTOutput")

class Embeddings(nn.Module):
    def __init__(self, c: BERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, ids: Tensor, token_type_ids: Optional[Tensor]) -> Tensor:
        S = ids.shape[1]
        if S > self.position_embeddings.num_embeddings:  # the embedding's bare IndexError names nothing
            raise ValueError(f"input_ids has {S} positions, more than max_position_embeddings "
                             f"({self.position_embeddings.num_embeddings})")
        pos = torch.arange(S, device=ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.drop(self.norm(x))


class MLMHead(nn.Module):
    def __init__(self, c: BERTConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = c.activation
        self.norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.decoder = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        h = ops.linear_act(h, self.dense.weight, self.dense.bias, self.activation)  # GEMM + act, fused
        return self.decoder(self.norm(h)) + self.bias


class BERT(nn.Module):
    """``forward(input_ids (B, S), token_type_ids=None, attention_mask=None, labels=None)``
    → :class:`BERTOutput`. ``attention_mask (B, S)``: 1/True for real tokens, 0 for padding."""

    config_class = BERTConfig

    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = Embeddings(c)
        self.layers = nn.ModuleList([
            Block(c.hidden_size, c.num_heads, qkv_bias=True, norm_first=False, eps=c.layer_norm_eps,
                  act=c.activation, drop=c.dropout, attn_drop=c.attention_dropout,
                  mlp_hidden_dim=c.intermediate_size)
            for _ in range(c.num_layers)
        ])
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if c.pooler else None
        self.mlm_head = MLMHead(c, self.embeddings.word_embeddings) if c.mlm_head else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> BERTOutput:
        """Encode ``input_ids`` (bidirectional); with the MLM head, also token logits and the loss.

        Args:
            input_ids: token indices ``(B, S)``, ``S <= max_position_embeddings``.
            token_type_ids: segment ids ``(B, S)``; ``None`` means all 0.
            attention_mask: ``(B, S)``: nonzero / ``True`` for real tokens, 0 for padding. Padded
                keys are masked out of attention (padded positions still get outputs).
            labels: MLM targets ``(B, S)``; ``-100`` entries are ignored by the loss.

        Returns:
            :class:`BERTOutput`: ``last_hidden_state`` ``(B, S, hidden_size)``; ``pooler_output``
            ``(B, hidden_size)``, ``tanh(pooler(h[:, 0]))`` (``None`` without the pooler); ``logits``
            ``(B, S, vocab_size)`` (``None`` without the MLM head); ``loss``, the mean cross-entropy
            computed in float32 (``None`` without ``labels``).

        Raises:
            ValueError: ``input_ids`` is not 2-D, ``attention_mask`` does not have its shape, ``S``
                exceeds ``max_position_embeddings``, or ``labels`` are given without the MLM head.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): a view SDPA broadcasts
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            if self.config.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        logits = self.mlm_head(x) if self.mlm_head is not None else None
        loss = None
        if labels is not None:
            if logits is None:
                raise ValueError("labels need the MLM head (BERTConfig.mlm_head=True)")
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        return BERTOutput(x, pooled, logits, loss)

    @classmethod
    def from_hf(cls, model_or_path, **overrides) -> "BERT":
        """Load a Hugging Face BERT (``BertModel``, ``BertForMaskedLM``, ``BertForPreTraining``
        object, or a local directory with ``config.json`` + ``*.safetensors``); no network. Returned in
        eval mode, as ``from_pretrained`` returns it."""
        from .hf_convert import bert_from_hf

        return bert_from_hf(cls, model_or_path, **overrides)

    def to_hf(self):
        """This model as ``transformers.BertForMaskedLM`` (with the MLM head) or ``BertModel``."""
        from .hf_convert import bert_to_hf

        return bert_to_hf(self)
