"""Hugging Face transformers: run any model that supports attention backends on fastformer.

    import fastformer.integrations.hf as ff_hf
    ff_hf.register()
    model = AutoModel.from_config(cfg, attn_implementation="fastformer")
    # or, for a loaded model: model.set_attn_implementation("fastformer")

``register()`` adds ``"fastformer"`` to two registries of transformers:

* ``AttentionInterface`` — the attention function each layer calls (here:
  :func:`fastformer.attention`, i.e. the fastest fused backend for the device);
* ``AttentionMaskInterface`` — how the model builds its mask. Without this entry
  transformers builds *no mask at all* for an unknown implementation, and causal
  (and padding) masking would be silently lost. We use transformers' SDPA mask
  builder: a bool ``(B, 1, L, S)`` mask with ``True`` = attend, or ``None`` when
  the mask is purely causal (then the kernel's causal mode runs, no mask read).

Models opt in through ``_supports_attention_backend`` (GPT-2, BERT, ViT, Llama,
and most current architectures do).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import attention

__all__ = ["register", "fastformer_attention_forward", "NAME"]

NAME = "fastformer"


def fastformer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract.

    Args:
        query: ``(B, Hq, L, D)``; key/value: ``(B, Hkv, S, D)`` (``Hq`` a multiple of ``Hkv``: GQA).
        attention_mask: ``None``, bool ``(B or 1, 1 or H, L, S)`` with ``True`` = attend, or float (added).
        dropout: attention dropout probability (the model passes 0 in eval).
        scaling: score scale (``None`` = ``1/sqrt(D)``).
        is_causal: overrides ``module.is_causal``; used only when there is no mask
            and more than one query (as transformers' SDPA path).
        kwargs: ``position_bias`` (T5-style, added to the scores) is supported;
            ``softcap`` is not (raises).

    Returns:
        ``(out (B, L, Hq, D), None)`` — attention weights are not materialised.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='fastformer' does not support `softcap`; use 'eager' or 'flex_attention'")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        # bool, float32 and query's dtype pass as they are (as transformers' SDPA path hands them
        # to torch: a float32 mask is added in float32); anything else becomes query's dtype.
        attention_mask = attention_mask.to(query.dtype)

    out = attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"fastformer"`` with transformers' attention and mask interfaces (idempotent).

    Raises ImportError when transformers is not installed.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, fastformer_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds masks inside each model: nothing to register
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)
