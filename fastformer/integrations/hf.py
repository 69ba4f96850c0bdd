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
  Sliding-window layers (Mistral, Gemma 2/3, ...) without padding also get ``None``
  when the queries are the last keys (prefill, or one token decoding over the
  cache): the layer's ``sliding_window`` then runs as the kernels' native window
  (``window_size=(sliding_window - 1, 0)``, bottom-right aligned), whose cost grows
  as L·W where the dense L×S mask's grows as L·S. Padding, or queries that are not
  the cache's last tokens, keep transformers' dense mask (which holds the window).

The attention function forwards ``softcap`` (Gemma 2's ``attn_logit_softcapping``)
and ``sliding_window`` from the attention interface's keyword arguments to the kernels.

Models opt in through ``_supports_attention_backend`` (GPT-2, BERT, ViT, Llama,
and most current architectures do).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops import attention

__all__ = ["register", "fastformer_attention_forward", "fastformer_mask", "NAME"]

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
        kwargs: ``position_bias`` (T5-style, added to the scores); ``softcap`` (``None`` or
            ``> 0``: scores become ``softcap * tanh(scores / softcap)`` before the mask);
            ``sliding_window`` (``None`` or ``W``: a query sees itself and the ``W - 1`` keys
            before it; run natively when the mask builder left the mask out, see
            :func:`fastformer_mask`, else the dense mask already holds it).

    Returns:
        ``(out (B, L, Hq, D), None)`` — attention weights are not materialised.
    """
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap is not None else 0.0
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    variant = {}
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and attention_mask is None and (q_len == 1 or q_len == kv_len):
        # fastformer_mask left the window to us: the queries are the last q_len of the keys, so
        # the window (and the causal mask with it) is bottom-right aligned.
        variant = dict(window_size=(int(sliding_window) - 1, 0), causal_bottom_right=True)
    if softcap > 0.0:
        variant["softcap"] = softcap
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
        **variant,
    )
    return out.transpose(1, 2).contiguous(), None


def _queries_are_last_keys(attention_mask, q_length, kv_length, q_offset, kv_offset) -> bool:
    """No padding, and the queries are the last ``q_length`` of the ``kv_length`` key
    positions (bottom-right alignment), with ``q_length`` 1 or ``kv_length``."""
    if q_length != 1 and q_length != kv_length:
        return False
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False  # reading a tensor offset (static caches) would break a compiled graph: keep the dense mask
    if int(q_offset) + q_length != int(kv_offset) + kv_length:
        return False
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2:
        return False
    from transformers.masking_utils import prepare_padding_mask

    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # pads the end with False
    return bool(padding[:, int(kv_offset):int(kv_offset) + kv_length].all())


def _is_sliding_window_causal(mask_function, window: int) -> bool:
    """Whether ``mask_function`` (transformers' index-based ``(batch, head, q, kv) -> bool``) is the
    causal sliding window of ``window`` tokens: ``kv <= q`` and ``kv > q - window``. Other masks
    built with a ``local_size`` (Llama 4's chunked attention) differ at the probed positions,
    which straddle the window's edges and a chunk boundary; anything that fails to evaluate
    counts as "no"."""
    if mask_function is None or not isinstance(window, int) or window < 1:
        return False
    q = torch.tensor(sorted({0, 1, window - 1, window, window + 1, 2 * window, 2 * window + 3}))
    kv = torch.arange(2 * window + 5)
    expected = (kv[None, :] <= q[:, None]) & (kv[None, :] > q[:, None] - window)
    try:
        got = mask_function(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                            q[None, None, :, None], kv[None, None, None, :])
        got = torch.as_tensor(got).to(torch.bool).expand(1, 1, len(q), len(kv))[0, 0]
    except Exception:  # noqa: BLE001 - an unknown mask function: keep the dense mask
        return False
    return torch.equal(got, expected)


def fastformer_mask(*args, local_size=None, allow_is_causal_skip: bool = True, **kwargs):
    """transformers' SDPA mask builder (``sdpa_mask``), except that a pure sliding-window causal
    mask (``local_size`` = the window) without padding is left out (``None``) when the kernels'
    native window reproduces it (see the module docstring). Same arguments and result as
    ``sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    if (local_size is not None and allow_is_causal_skip and not args and not torch.compiler.is_compiling()
            and _queries_are_last_keys(kwargs.get("attention_mask"), kwargs["q_length"], kwargs["kv_length"],
                                       kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0))
            and _is_sliding_window_causal(kwargs.get("mask_function"), local_size)):
        return None
    return sdpa_mask(*args, local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register() -> None:
    """Register ``"fastformer"`` with transformers' attention and mask interfaces (idempotent).

    Raises ImportError when transformers is not installed.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, fastformer_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError:  # transformers < 4.53 builds masks inside each model: nothing to register
        return
    AttentionMaskInterface.register(NAME, fastformer_mask)
