"""The encoder-decoder Transformer of "Attention Is All You Need".

Sinusoidal positions, a bidirectional encoder (source padding masked), and a
decoder with causal self-attention and cross-attention to the encoder memory.
Decoding (greedy and beam search) keeps the decoder's self-attention K/V in a
preallocated :class:`KVCache` (one new token per step through
:func:`fastformer.decode_attention`) and projects the memory to cross-attention
K/V once per source, not once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import nn as nnf
from .. import ops
from ..nn import KVCache
from ..nn._fused import add_layer_norm


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    max_len: int = 512
    norm_first: bool = True  # pre-norm trains without warm-up tricks; False is the paper's post-norm
    activation: str = "relu"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    layer_norm_eps: float = 1e-5


# Decoder-layer parameter names before the layers were built from fastformer.nn (loaded unchanged).
_OLD_NAMES = {"self_qkv.": "self_attn.qkv.", "self_proj.": "self_attn.proj.", "cross_q.": "cross_attn.q.",
              "cross_kv.": "cross_attn.kv.", "cross_proj.": "cross_attn.proj."}


class DecoderLayer(nn.Module):
    """Causal self-attention (KV-cached when decoding), cross-attention to the encoder memory,
    MLP; residual adds fused into the LayerNorms that follow them."""

    def __init__(self, c: Seq2SeqConfig):
        super().__init__()
        d = c.d_model
        self.norm_first = c.norm_first
        self.self_attn = nnf.Attention(d, c.num_heads, qkv_bias=True, attn_drop=c.dropout, proj_drop=c.dropout)
        self.cross_attn = nnf.CrossAttention(d, c.num_heads, attn_drop=c.dropout, proj_drop=c.dropout)
        self.norm1 = nnf.LayerNorm(d, eps=c.layer_norm_eps)
        self.norm2 = nnf.LayerNorm(d, eps=c.layer_norm_eps)
        self.norm3 = nnf.LayerNorm(d, eps=c.layer_norm_eps)
        self.mlp = nnf.Mlp(d, c.dim_feedforward, act_layer=c.activation, drop=c.dropout)
        self._register_load_state_dict_pre_hook(self._old_names)

    @staticmethod
    def _old_names(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in _OLD_NAMES.items():
                if rest.startswith(old):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)

    def memory_kv(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the encoder memory ``(B, S, d)`` → 2 × ``(B, h, S, hd)``."""
        return self.cross_attn.memory_kv(memory)

    def forward(self, x: Tensor, mem_kv, mem_mask: Optional[Tensor], cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        if self.norm_first:
            x = x + self.self_attn(self.norm1(x), None, True, cache, layer)
            h, x = add_layer_norm(self.cross_attn(self.norm2(x), attn_mask=mem_mask, memory_kv=mem_kv), self.norm3,
                                  residual=x, return_residual=True)
            return x + self.mlp(h)
        x = add_layer_norm(self.self_attn(x, None, True, cache, layer), self.norm1, residual=x)
        x = add_layer_norm(self.cross_attn(x, attn_mask=mem_mask, memory_kv=mem_kv), self.norm2, residual=x)
        return add_layer_norm(self.mlp(x), self.norm3, residual=x)


class Seq2SeqTransformer(nn.Module):
    """``forward(src (B, S), tgt_in (B, T), tgt_out=None)`` → logits ``(B, T, tgt_vocab)``
    (and the cross-entropy loss over non-pad ``tgt_out`` when given). Source tokens equal
    to ``pad_id`` are masked out of attention."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList([
            nnf.Block(c.d_model, c.num_heads, norm_first=c.norm_first, eps=c.layer_norm_eps, act=c.activation,
                      drop=c.dropout, attn_drop=c.dropout, mlp_hidden_dim=c.dim_feedforward)
            for _ in range(c.num_encoder_layers)
        ])
        self.decoder = nn.ModuleList([DecoderLayer(c) for _ in range(c.num_decoder_layers)])
        self.enc_norm = nnf.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.dec_norm = nnf.LayerNorm(c.d_model, eps=c.layer_norm_eps) if c.norm_first else nn.Identity()
        self.out = nn.Linear(c.d_model, c.tgt_vocab_size)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _embed(self, emb: nn.Embedding, ids: Tensor, start: int = 0) -> Tensor:
        T = ids.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len {self.config.max_len}")
        # Sinusoidal positions start..start+T-1, added by the fused op (no table in memory).
        return self.drop(ops.add_sinusoidal_positions(emb(ids) * math.sqrt(self.config.d_model), start))

    def encode(self, src: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Encoder memory ``(B, S, d)`` and the source padding mask ``(B, 1, 1, S)`` (None without padding)."""
        if src.dim() != 2:
            raise ValueError(f"src must be (B, S) token ids, got shape {tuple(src.shape)}")
        keep = src != self.config.pad_id
        # Without padding the mask is dropped (the kernels' fastest path). Under torch.compile /
        # torch.export the all-True mask is kept instead: same result, no data-dependent branch.
        mask = None if not torch.compiler.is_compiling() and bool(keep.all()) else keep[:, None, None, :]
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def decode(self, tgt: Tensor, mem_kv: List[Tuple[Tensor, Tensor]], mem_mask: Optional[Tensor],
               cache: Optional[KVCache] = None) -> Tensor:
        """Logits ``(B, T, tgt_vocab)`` of target tokens ``tgt`` (those after ``cache.length``
        cached ones when a cache is given; the cache is advanced)."""
        start = cache.length if cache is not None else 0
        x = self._embed(self.tgt_embed, tgt, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, mem_kv[i], mem_mask, cache, i)
        if cache is not None:
            cache.advance(tgt.shape[1])
        return self.out(self.dec_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Optional[Tensor] = None):
        """Teacher-forced logits of the target sequence.

        Args:
            src: source token ids ``(B, S)``; tokens equal to ``pad_id`` are masked out as keys of
                the encoder's self-attention and of the decoder's cross-attention.
            tgt_in: decoder input ids ``(B, T)`` (e.g. ``bos_id`` then the target without its last
                token); causal self-attention only, ``pad_id`` tokens are not masked.
            tgt_out: ``None`` or the target ids ``(B, T)``; ``pad_id`` entries are ignored by the loss.

        Returns:
            Logits ``(B, T, tgt_vocab_size)``, or ``(logits, loss)`` with ``tgt_out``: the mean
            cross-entropy over non-pad targets, computed in float32.

        Raises:
            ValueError: ``src`` is not 2-D, or ``S`` or ``T`` exceeds ``max_len``.
        """
        memory, mask = self.encode(src)
        logits = self.decode(tgt_in, [layer.memory_kv(memory) for layer in self.decoder], mask)
        if tgt_out is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt_out.reshape(-1),
                               ignore_index=self.config.pad_id)
        return logits, loss

    # ------------------------------------------------------------------ decoding
    def _start(self, src: Tensor, copies: int, max_len: int):
        memory, mask = self.encode(src)
        if copies > 1:
            memory = memory.repeat_interleave(copies, 0)
            mask = mask.repeat_interleave(copies, 0) if mask is not None else None
        mem_kv = [layer.memory_kv(memory) for layer in self.decoder]  # once per source
        c = self.config
        cache = KVCache(c.num_decoder_layers, memory.shape[0], c.num_heads, max_len + 1, c.d_model // c.num_heads,
                        dtype=memory.dtype, device=memory.device)
        return mem_kv, mask, cache

    @torch.inference_mode()
    def greedy_decode(self, src: Tensor, max_len: int = 64, use_cache: bool = True) -> Tensor:
        """Target ids ``(B, T<=max_len)`` after BOS, padded with ``pad_id`` after EOS (EOS kept)."""
        c = self.config
        B = src.shape[0]
        mem_kv, mask, cache = self._start(src, 1, max_len)
        ys = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            if use_cache:
                logits = self.decode(ys[:, -1:], mem_kv, mask, cache)[:, -1]
            else:
                logits = self.decode(ys, mem_kv, mask)[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, c.pad_id)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        return ys[:, 1:]

    @torch.inference_mode()
    def beam_search(self, src: Tensor, beam_size: int = 4, max_len: int = 64, length_penalty: float = 1.0) -> Tensor:
        """Best hypothesis per source ``(B, T<=max_len)``, padded with ``pad_id`` after EOS.

        Beams are scored by summed log-probability; finished hypotheses keep their
        score (they extend only with pad at log-prob 0) and the final choice divides
        by ``length ** length_penalty``. The KV cache follows the surviving beams
        through :meth:`KVCache.reorder`.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        c = self.config
        B, K = src.shape[0], beam_size
        dev = src.device
        mem_kv, mask, cache = self._start(src, K, max_len)
        seqs = torch.full((B * K, 1), c.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one live
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B * K, device=dev)
        for _ in range(max_len):
            logp = self.decode(seqs[:, -1:], mem_kv, mask, cache)[:, -1].float().log_softmax(-1)  # (B*K, V)
            V = logp.shape[-1]
            finished_row = torch.full_like(logp[0], float("-inf"))
            finished_row[c.pad_id] = 0.0
            logp = torch.where(done[:, None], finished_row, logp)
            cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            scores, idx = cand.topk(K, dim=-1)  # (B, K)
            beam = idx // V
            tok = idx % V
            rows = (torch.arange(B, device=dev)[:, None] * K + beam).reshape(-1)
            cache.reorder(rows)
            seqs = torch.cat([seqs[rows], tok.reshape(-1, 1)], dim=1)
            lengths = lengths[rows] + (~done[rows]).float()
            done = done[rows] | (tok.reshape(-1) == c.eos_id)
            if bool(done.all()):
                break
        final = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
        best = final.view(B, K).argmax(-1)
        return seqs.view(B, K, -1)[torch.arange(B, device=dev), best, 1:]

    def generate(self, src: Tensor, max_len: int = 64, beam_size: int = 1, **kwargs) -> Tensor:
        """Greedy decoding (``beam_size=1``) or beam search."""
        if beam_size == 1:
            return self.greedy_decode(src, max_len)
        return self.beam_search(src, beam_size, max_len, **kwargs)
