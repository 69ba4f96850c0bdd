"""GPT: a decoder-only transformer in the style of nanoGPT, on fastformer's attention.

Reads top-down: attention → MLP → block → config → model. Learned (GPT-2),
rotary or ALiBi positions, grouped-query attention, a sliding attention window
(Mistral) and attention logit soft-capping (Gemma 2), tied input/output embeddings,
gradient checkpointing, and ``generate`` with a preallocated KV cache whose
decoding steps run :func:`fastformer.decode_attention`.

Parameter names follow nanoGPT / Hugging Face GPT-2 (``transformer.h.0.attn.c_attn``),
so :meth:`GPT.from_hf` only transposes GPT-2's ``Conv1D`` weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import nn as nnf
from ..nn import KVCache, LayerNorm, RenamedSubmodules
from ..nn._fused import apply_linear
from .sampling import sample_next


class CausalSelfAttention(RenamedSubmodules, nnf.Attention):
    """``nn.Attention`` under nanoGPT / GPT-2 names: ``c_attn`` (q, k, v in one matmul), ``c_proj``.
    GQA when ``n_kv_head < n_head``; rotary positions when ``pos_embedding="rotary"``, ALiBi when
    ``"alibi"``; ``sliding_window`` and ``attn_softcap`` as the config says; decoding steps read
    the KV cache with the decode kernel (the same variants)."""

    RENAMED = {"qkv": "c_attn", "proj": "c_proj"}

    def __init__(self, config: "GPTConfig"):
        n_kv_head = config.n_kv_head or config.n_head
        if config.n_embd % config.n_head or config.n_head % n_kv_head:
            raise ValueError(f"n_embd ({config.n_embd}) must divide by n_head ({config.n_head}) and n_head by "
                             f"n_kv_head ({n_kv_head})")
        rotary = None
        if config.pos_embedding == "rotary":
            rotary = nnf.RotaryEmbedding(config.n_embd // config.n_head, base=config.rotary_base)
        # A token sees itself and the sliding_window - 1 tokens before it: window_size (W - 1, 0).
        window = (config.sliding_window - 1, 0) if config.sliding_window else (-1, -1)
        super().__init__(config.n_embd, config.n_head, qkv_bias=config.bias, proj_bias=config.bias,
                         attn_drop=config.dropout, proj_drop=config.dropout, num_kv_heads=n_kv_head, rotary=rotary,
                         window_size=window, alibi=config.pos_embedding == "alibi", softcap=config.attn_softcap)
        self._rename()


class MLP(RenamedSubmodules, nnf.Mlp):
    """``nn.Mlp`` (the fused FFN) under GPT-2's names: ``c_fc``, ``c_proj``."""

    RENAMED = {"fc1": "c_fc", "fc2": "c_proj"}

    def __init__(self, config: "GPTConfig"):
        super().__init__(config.n_embd, int(config.mlp_ratio * config.n_embd), act_layer=config.activation,
                         bias=config.bias, drop=config.dropout)
        self._rename()


class Block(RenamedSubmodules, nnf.Block):
    """Pre-norm ``nn.Block`` (residual add fused into ``ln_2``) under GPT-2's names: ``ln_1``, ``attn``, ``ln_2``, ``mlp``."""

    RENAMED = {"norm1": "ln_1", "norm2": "ln_2"}

    def __init__(self, config: "GPTConfig"):
        super().__init__(config.n_embd, config.n_head, config.mlp_ratio, norm_first=True, eps=config.layer_norm_eps,
                         norm_bias=config.bias, attn_layer=lambda *a, **k: CausalSelfAttention(config),
                         mlp_layer=lambda *a, **k: MLP(config))
        self._rename()


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence (the learned position table's length)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # < n_head: grouped-query attention
    n_embd: int = 768
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    pos_embedding: str = "learned"  # "learned" (GPT-2), "rotary", or "alibi" (no position embedding; BLOOM, MPT)
    rotary_base: float = 10000.0
    sliding_window: Optional[int] = None  # each token attends to itself and the sliding_window - 1 before it (Mistral)
    attn_softcap: float = 0.0  # > 0: scores -> attn_softcap * tanh(scores / attn_softcap) (Gemma 2's 50.0)
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"
    use_checkpoint: bool = False  # recompute each block in the backward pass to save memory


class GPT(nn.Module):
    """Decoder-only language model.

    ``forward(ids (B, T))`` → logits ``(B, T, vocab_size)``; with ``targets (B, T)``
    → ``(logits, loss)`` (cross-entropy, targets ``-1`` ignored).
    """

    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.pos_embedding not in ("learned", "rotary", "alibi"):
            raise ValueError(f"pos_embedding must be 'learned', 'rotary' or 'alibi', got {config.pos_embedding!r}")
        if config.sliding_window is not None and (isinstance(config.sliding_window, bool)
                                                  or not isinstance(config.sliding_window, int)
                                                  or config.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or an int >= 1, got {config.sliding_window!r}")
        if not (isinstance(config.attn_softcap, (int, float)) and 0.0 <= config.attn_softcap < float("inf")):
            raise ValueError(f"attn_softcap must be a finite float >= 0 (0 = off), got {config.attn_softcap!r}")
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        )
        if config.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        T = ids.shape[1]
        if start + T > self.config.block_size and self.config.pos_embedding == "learned":
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(ids)
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=ids.device))
        # (rotary positions are applied to q and k inside each attention layer, from the cache's length;
        # ALiBi's bias is added to the scores inside the attention kernels)
        return self.transformer.drop(x)

    def hidden_states(self, ids: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """Final-norm hidden states ``(B, T, n_embd)``; with ``cache``, ``ids`` are the
        tokens after the ``cache.length`` already cached (the cache is advanced)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, T) token indices, got shape {tuple(ids.shape)}")
        start = cache.length if cache is not None else 0
        x = self._embed(ids, start)
        for i, block in enumerate(self.transformer.h):
            if self.config.use_checkpoint and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, None, True, use_reentrant=False)
            else:
                x = block(x, None, True, cache, i)
        if cache is not None:
            cache.advance(ids.shape[1])
        return self.transformer.ln_f(x)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None):
        """Next-token logits of ``ids`` (causal attention).

        Args:
            ids: token indices ``(B, T)``.
            targets: ``None`` or the next tokens ``(B, T)``; ``-1`` entries are ignored by the loss.
            cache: a :class:`KVCache` (see :meth:`new_cache`): ``ids`` are then the tokens after the
                ``cache.length`` already cached; their keys/values are written and the cache is
                advanced by ``T``.

        With ``config.use_checkpoint``, in training without a cache, each block is recomputed in
        the backward pass.

        Returns:
            Logits ``(B, T, vocab_size)``, or ``(logits, loss)`` with ``targets``: the mean
            cross-entropy over the non-ignored targets, computed in float32.

        Raises:
            ValueError: ``ids`` is not 2-D, or (learned positions) ``cache.length + T`` exceeds
                ``block_size``.
            RuntimeError: from :meth:`KVCache.write` when the cache cannot hold ``T`` more tokens.
        """
        x = self.hidden_states(ids, cache)
        logits = apply_linear(self.lm_head, x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens, in the model's dtype."""
        c = self.config
        w = self.transformer.wte.weight
        return KVCache(c.n_layer, batch, c.n_kv_head or c.n_head, max_len, c.n_embd // c.n_head,
                       dtype=w.dtype, device=w.device)

    @torch.inference_mode()  # cheaper per op than no_grad: ~5% per decoded token on CPU
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue ``ids (B, T)`` by up to ``max_new_tokens`` tokens → ``(B, T + n)``.

        ``temperature=0`` is greedy decoding (argmax); otherwise tokens are sampled
        from the softmax of ``logits / temperature`` restricted to the ``top_k`` most
        likely and/or the nucleus of probability ``top_p`` (transformers' warpers:
        :func:`~fastformer.models.sampling.sample_next`). Sequences that
        emit ``eos_token_id`` are padded with it; generation stops when all have.
        ``use_cache=False`` recomputes the whole sequence each step (the reference
        that the cached path must reproduce token for token).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        B, T = ids.shape
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out = ids
        step_input = ids
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(step_input, cache=cache)[:, -1]
            else:
                logits = self(out)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return out

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, model_or_path, **overrides) -> "GPT":
        """Load a Hugging Face GPT-2 (``GPT2LMHeadModel``/``GPT2Model`` object, or a local
        directory with ``config.json`` + ``*.safetensors``); no network. Returned in eval mode, as
        ``from_pretrained`` returns it."""
        from .hf_convert import gpt2_from_hf

        return gpt2_from_hf(cls, model_or_path, **overrides)

    def to_hf(self):
        """This model as a ``transformers.GPT2LMHeadModel`` (learned positions, MHA only)."""
        from .hf_convert import gpt2_to_hf

        return gpt2_to_hf(self)
