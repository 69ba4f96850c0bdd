"""Drop-ins for torch.nn's ``Transformer``, its encoder/decoder stacks and layers.

Constructor arguments, defaults, submodule names (so ``state_dict`` keys),
forward signatures and mask conventions are torch's. Inside, each layer runs
fastformer's :class:`~fastformer.nn.MultiheadAttention` (fused attention, no
head-splitting copies), the residual add + dropout + LayerNorm as one fused op,
and the first feed-forward GEMM with its activation fused (relu/gelu; any other
callable runs as given).
"""

import copy
import warnings
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention.problem import is_causal_bias
from ._fused import activation_name, add_layer_norm, linear_act, make_layer_norm
from .activation import MultiheadAttention, _check_mask_dtype

__all__ = [
    "Transformer",
    "TransformerEncoder",
    "TransformerDecoder",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "generate_square_subsequent_mask",
]


def generate_square_subsequent_mask(
    sz: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """``(sz, sz)`` float causal mask: ``-inf`` above the diagonal, ``0`` elsewhere (torch's)."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def _activation_fn(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    return activation


def _seq_len(src: Tensor, batch_first: bool) -> Optional[int]:
    if not torch.jit.is_scripting() and src.is_nested:
        return None
    if src.dim() == 2:
        return src.shape[0]
    return src.shape[1 if batch_first else 0]


def _detect_is_causal_mask(mask: Optional[Tensor], is_causal: Optional[bool], size: Optional[int]) -> bool:
    """torch's rule: an explicit ``is_causal`` wins; ``None`` means "is ``mask`` the causal mask?".

    A :class:`~torch.nn.attention.bias.CausalBias` mask carries its own causality (and
    alignment): the hint stays off and the attention runs it natively."""
    if is_causal is not None:
        return is_causal
    if mask is None:
        return False
    if not torch.jit.is_scripting():
        if is_causal_bias(mask):
            return False
    sz = size if size is not None else mask.size(-2)
    causal = generate_square_subsequent_mask(sz, device=mask.device, dtype=mask.dtype)
    return mask.size() == causal.size() and bool((mask == causal).all())


@torch.jit.unused
def _branch_dropout(x: Tensor, dropout: nn.Module) -> Tuple[Tensor, float]:
    """``(x, p)`` for a fused op that applies dropout ``p`` to ``x`` itself.

    torch's layers call each ``Dropout`` submodule, so each follows its own ``training``
    flag (a layer in train mode whose dropouts are in eval runs without dropout); here a
    ``nn.Dropout`` is read the same way (``p`` in training mode, else 0) and fused, and any
    other module put in its place is called as torch would call it."""
    if type(dropout) is nn.Dropout:
        return x, (dropout.p if dropout.training else 0.0)
    return dropout(x), 0.0


class TransformerEncoderLayer(nn.Module):
    r"""Self-attention + feed-forward block, ``torch.nn.TransformerEncoderLayer``'s drop-in.

    Args (torch's): ``d_model``, ``nhead``, ``dim_feedforward=2048``, ``dropout=0.1``,
    ``activation=F.relu`` (``"relu"``, ``"gelu"`` or a callable), ``layer_norm_eps=1e-5``,
    ``batch_first=False``, ``norm_first=False``, ``bias=True``, ``device``, ``dtype``.

    Forward: ``src`` ``(S, B, E)`` / ``(B, S, E)`` / ``(S, E)``, ``src_mask`` ``(S, S)`` or
    ``(B·H, S, S)`` (or a ``CausalBias``), ``src_key_padding_mask`` ``(B, S)`` (bool ``True`` =
    padding, or float), ``is_causal`` (hint that ``src_mask`` is causal). Returns ``src``'s shape.

    Dropout, as in torch, follows each submodule's own mode: ``dropout1``/``dropout2``/``dropout``
    apply while *they* are in training mode, the attention dropout while ``self_attn`` is;
    the layer's own ``training`` flag is not read. The random masks are fastformer's own
    (seeded from torch's generator), not torch's stream. Under ``torch.jit.script`` the layer
    runs torch's formulas with plain torch ops around fastformer's attention op.
    """

    __constants__ = ["norm_first"]

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs)
        self.norm2 = make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation_fn(activation)
        name = activation_name(self.activation)
        # torch's attribute (1 relu, 2 gelu, 0 other), kept for code that reads it.
        self.activation_relu_or_gelu = {"relu": 1, "gelu": 2}.get(name, 0)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "activation"):
            self.activation = F.relu

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        r"""Pass the input through the encoder layer, as ``torch.nn.TransformerEncoderLayer``.

        Args:
            src: the sequence to the encoder layer: ``(S, B, E)``, ``(B, S, E)`` if ``batch_first``,
                or unbatched ``(S, E)``.
            src_mask: the mask for the src sequence, ``(S, S)`` or ``(B·nhead, S, S)``: bool ``True`` =
                *not* allowed to attend, or float added to the attention scores. Also a
                :class:`torch.nn.attention.bias.CausalBias` (fastformer's extension, see
                :meth:`MultiheadAttention.forward`).
            src_key_padding_mask: the mask for the src keys per batch, ``(B, S)`` (``(S,)`` unbatched):
                bool ``True`` = ignore that key (padding), or float added to the scores.
            is_causal: hint that ``src_mask`` is the causal mask; a wrong hint gives wrong results.
                Without ``src_key_padding_mask``, the kernel's causal mode then replaces ``src_mask``.

        Dropout follows each submodule's own training mode (see the class docstring).

        Returns:
            ``src``'s shape.

        Raises:
            ``RuntimeError`` when ``is_causal`` is set without ``src_mask``; shape and dtype errors as
            :meth:`MultiheadAttention.forward`.
        """
        if torch.jit.is_scripting():
            return self._forward_unfused(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            attn, p1 = _branch_dropout(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal), self.dropout1)
            # x + dropout1(attn) and norm2 of it, in one fused op.
            h, x = add_layer_norm(attn, self.norm2, residual=x, dropout_p=p1, return_residual=True)
            return x + self.dropout2(self._ff_block(h))
        attn, p1 = _branch_dropout(self._sa_block(x, src_mask, src_key_padding_mask, is_causal), self.dropout1)
        x = add_layer_norm(attn, self.norm1, residual=x, dropout_p=p1)
        ff, p2 = _branch_dropout(self._ff_block(x), self.dropout2)
        return add_layer_norm(ff, self.norm2, residual=x, dropout_p=p2)

    def _forward_unfused(
        self, src: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor], is_causal: bool
    ) -> Tensor:
        """torch's formulas with plain torch ops around fastformer's attention (the TorchScript path)."""
        x = src
        if self.norm_first:
            x = x + self.dropout1(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal))
            return x + self.dropout2(self._ff_block_unfused(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self._sa_block(x, src_mask, src_key_padding_mask, is_causal)))
        return self.norm2(x + self.dropout2(self._ff_block_unfused(x)))

    def _sa_block(
        self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool
    ) -> Tensor:
        return self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]

    @torch.jit.unused
    def _ff_block(self, x: Tensor) -> Tensor:
        """``linear2(dropout(activation(linear1(x))))``, the first GEMM fused with its activation."""
        return self.linear2(self.dropout(linear_act(x, self.linear1, self.activation)))

    def _ff_block_unfused(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerDecoderLayer(nn.Module):
    r"""Self-attention + cross-attention + feed-forward block, ``torch.nn.TransformerDecoderLayer``'s drop-in.

    Args: as :class:`TransformerEncoderLayer`. Forward: ``tgt`` ``(T, B, E)`` / ``(B, T, E)``
    / ``(T, E)``, ``memory`` ``(S, B, E)`` / ``(B, S, E)`` / ``(S, E)``, ``tgt_mask`` ``(T, T)``,
    ``memory_mask`` ``(T, S)``, ``tgt_key_padding_mask`` ``(B, T)``,
    ``memory_key_padding_mask`` ``(B, S)``, ``tgt_is_causal``, ``memory_is_causal``.
    Returns ``tgt``'s shape. Dropout and TorchScript: as :class:`TransformerEncoderLayer`.
    """

    __constants__ = ["norm_first"]

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias, **factory_kwargs)
        self.multihead_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias, **factory_kwargs
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs)
        self.norm2 = make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs)
        self.norm3 = make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation_fn(activation)

    def __setstate__(self, state):
        if "activation" not in state:
            state["activation"] = F.relu
        super().__setstate__(state)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        r"""Pass the inputs (and masks) through the decoder layer, as ``torch.nn.TransformerDecoderLayer``.

        Args:
            tgt: the sequence to the decoder layer: ``(T, B, E)``, ``(B, T, E)`` if ``batch_first``,
                or unbatched ``(T, E)``.
            memory: the sequence from the last layer of the encoder: ``(S, B, E)``, ``(B, S, E)``
                if ``batch_first``, or unbatched ``(S, E)``.
            tgt_mask: the mask for the tgt sequence, ``(T, T)`` or ``(B·nhead, T, T)``.
            memory_mask: the mask for the memory sequence, ``(T, S)`` or ``(B·nhead, T, S)``.
            tgt_key_padding_mask: the mask for the tgt keys per batch, ``(B, T)`` (``(T,)`` unbatched).
            memory_key_padding_mask: the mask for the memory keys per batch, ``(B, S)`` (``(S,)`` unbatched).
            tgt_is_causal: hint that ``tgt_mask`` is the causal mask; a wrong hint gives wrong results.
            memory_is_causal: hint that ``memory_mask`` is the causal mask.

        Masks as torch's: bool ``True`` = *not* allowed to attend (attention masks) or ignore that key
        (padding masks), or float added to the scores; ``tgt_mask`` and ``memory_mask`` may also be a
        ``CausalBias`` (see :meth:`MultiheadAttention.forward`). Dropout: as
        :meth:`TransformerEncoderLayer.forward`.

        Returns:
            ``tgt``'s shape.

        Raises:
            ``RuntimeError`` when a causal hint is set without its mask; shape and dtype errors as
            :meth:`MultiheadAttention.forward`.
        """
        if torch.jit.is_scripting():
            return self._forward_unfused(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
                memory_is_causal,
            )
        x = tgt
        if self.norm_first:
            attn, p1 = _branch_dropout(self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal), self.dropout1)
            h, x = add_layer_norm(attn, self.norm2, residual=x, dropout_p=p1, return_residual=True)
            cross, p2 = _branch_dropout(
                self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal), self.dropout2
            )
            h, x = add_layer_norm(cross, self.norm3, residual=x, dropout_p=p2, return_residual=True)
            return x + self.dropout3(self._ff_block(h))
        attn, p1 = _branch_dropout(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), self.dropout1)
        x = add_layer_norm(attn, self.norm1, residual=x, dropout_p=p1)
        cross, p2 = _branch_dropout(self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal), self.dropout2)
        x = add_layer_norm(cross, self.norm2, residual=x, dropout_p=p2)
        ff, p3 = _branch_dropout(self._ff_block(x), self.dropout3)
        return add_layer_norm(ff, self.norm3, residual=x, dropout_p=p3)

    def _forward_unfused(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor],
        memory_mask: Optional[Tensor],
        tgt_key_padding_mask: Optional[Tensor],
        memory_key_padding_mask: Optional[Tensor],
        tgt_is_causal: bool,
        memory_is_causal: bool,
    ) -> Tensor:
        """torch's formulas with plain torch ops around fastformer's attention (the TorchScript path)."""
        x = tgt
        if self.norm_first:
            x = x + self.dropout1(self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = x + self.dropout2(
                self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            )
            return x + self.dropout3(self._ff_block_unfused(self.norm3(x)))
        x = self.norm1(x + self.dropout1(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)))
        x = self.norm2(
            x + self.dropout2(self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        )
        return self.norm3(x + self.dropout3(self._ff_block_unfused(x)))

    def _sa_block(
        self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool
    ) -> Tensor:
        return self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, need_weights=False
        )[0]

    def _mha_block(
        self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool
    ) -> Tensor:
        return self.multihead_attn(
            x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, need_weights=False
        )[0]

    @torch.jit.unused
    def _ff_block(self, x: Tensor) -> Tensor:
        """``linear2(dropout(activation(linear1(x))))``, the first GEMM fused with its activation."""
        return self.linear2(self.dropout(linear_act(x, self.linear1, self.activation)))

    def _ff_block_unfused(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _nesting_blocker(layer: nn.Module) -> str:
    """Why torch's TransformerEncoder would not use nested tensors with this layer ("" if it would)."""
    attn = getattr(layer, "self_attn", None)
    if not isinstance(layer, (TransformerEncoderLayer, nn.TransformerEncoderLayer)):
        return "encoder_layer was not TransformerEncoderLayer"
    if layer.norm_first:
        return "encoder_layer.norm_first was True"
    if not attn.batch_first:
        return "encoder_layer.self_attn.batch_first was not True(use batch_first for better inference performance)"
    if not attn._qkv_same_embed_dim:
        return "encoder_layer.self_attn._qkv_same_embed_dim was not True"
    if attn.in_proj_bias is None:
        return "encoder_layer.self_attn was passed bias=False"
    if not layer.activation_relu_or_gelu:
        return "encoder_layer.activation_relu_or_gelu was not True"
    if layer.norm1.eps != layer.norm2.eps:
        return "encoder_layer.norm1.eps was not equal to encoder_layer.norm2.eps"
    if attn.num_heads % 2 == 1:
        return "encoder_layer.self_attn.num_heads is odd"
    return ""


_PADDING_NOTE_SHOWN = False


@torch.jit.unused
def _warn_padding_computed() -> None:
    """Once per process: where torch's encoder would take its nested-tensor fast path, say
    why ours differs (as torch explains its own ``why_not_sparsity_fast_path``)."""
    global _PADDING_NOTE_SHOWN
    if not _PADDING_NOTE_SHOWN:
        _PADDING_NOTE_SHOWN = True
        warnings.warn(
            "fastformer.nn.TransformerEncoder: torch would run this call on nested tensors (its sparsity fast "
            "path, skipping padded positions); fastformer computes the padded positions with the fused kernels "
            "and writes zeros there, so outputs match torch's but padding is not skipped. "
            "(This note is shown once.)",
            stacklevel=3,
        )


def _left_aligned(keep: Tensor) -> bool:
    """Every row of ``keep`` (B, S) is ones then zeros: padding only at the end."""
    return bool((keep.cummin(dim=1)[0] == keep).all())


class TransformerEncoder(nn.Module):
    r"""A stack of ``num_layers`` copies of ``encoder_layer`` (+ optional final ``norm``).

    ``torch.nn.TransformerEncoder``'s drop-in: ``forward(src, mask=None,
    src_key_padding_mask=None, is_causal=None)``; ``is_causal=None`` detects a causal ``mask``.

    ``enable_nested_tensor`` and ``mask_check`` are accepted for compatibility. Where
    torch would run on nested tensors (eval, batch_first, key padding mask, no
    ``mask``, no gradients, ...), its output is ``0`` at padded positions: the same
    zeros are written here, so outputs match torch's everywhere. Padded positions are
    still computed (not skipped) — a possible speed-up for heavily padded batches — and a
    ``UserWarning`` says so once per process. When ``enable_nested_tensor`` cannot be used
    (e.g. ``bias=False``), the constructor warns with torch's words.
    """

    __constants__ = ["norm"]

    def __init__(
        self,
        encoder_layer: nn.Module,
        num_layers: int,
        norm: Optional[nn.Module] = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        why_not_sparsity_fast_path = _nesting_blocker(encoder_layer)
        # torch's warning, word for word: code and tests rely on it.
        if enable_nested_tensor and why_not_sparsity_fast_path:
            warnings.warn(
                f"enable_nested_tensor is True, but self.use_nested_tensor is False because {why_not_sparsity_fast_path}",
                stacklevel=2,
            )
        self.use_nested_tensor = enable_nested_tensor and not why_not_sparsity_fast_path
        self.mask_check = mask_check

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> Tensor:
        r"""Pass the input through the encoder layers in turn, then ``norm`` (if any).

        Args:
            src: the sequence to the encoder: ``(S, B, E)``, ``(B, S, E)`` if ``batch_first``, or
                unbatched ``(S, E)``.
            mask: the mask for the src sequence, ``(S, S)`` or ``(B·nhead, S, S)``: bool ``True`` =
                *not* allowed to attend, or float added to the scores.
            src_key_padding_mask: the mask for the src keys per batch, ``(B, S)`` (``(S,)`` unbatched):
                bool ``True`` = ignore that key (padding), or float added to the scores.
            is_causal: hint that ``mask`` is the causal mask; ``None`` (default) detects it, as torch.

        Where torch would take its nested-tensor path (see the class docstring), keys whose
        ``src_key_padding_mask`` entry is nonzero are dropped and the output is ``0`` at those
        positions before ``norm``, as torch's; they are still computed (a ``UserWarning`` once).

        Returns:
            ``src``'s shape.

        Raises:
            :class:`~fastformer.ops.errors.MultiheadAttentionDtypeError` for a mask that is neither
            bool nor floating; otherwise as :meth:`TransformerEncoderLayer.forward`.
        """
        _check_mask_dtype(mask, "mask")  # torch's encoder asserts this before anything else
        _check_mask_dtype(src_key_padding_mask, "src_key_padding_mask")
        first = self.layers[0]
        zero_padding = self._torch_would_nest(src, mask, src_key_padding_mask)
        causal = _detect_is_causal_mask(mask, is_causal, _seq_len(src, first.self_attn.batch_first))
        layer_padding = src_key_padding_mask
        pad: Optional[Tensor] = None
        if zero_padding and src_key_padding_mask is not None:
            # torch's nested path drops every key whose mask entry is nonzero (a float mask's values
            # are not added there) and outputs 0 at those positions: the layers see the same keys.
            pad = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0
            layer_padding = pad
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=causal, src_key_padding_mask=layer_padding)
        if pad is not None:
            if not torch.jit.is_scripting():
                _warn_padding_computed()
            output = output.masked_fill(pad.unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _torch_would_nest(self, src: Tensor, mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor]) -> bool:
        """torch's conditions for its nested-tensor path (whose output has zeros at padding);
        TorchScript-compatible, as torch's scripted encoder takes that path too."""
        if not self.use_nested_tensor or not torch.backends.mha.get_fastpath_enabled():
            return False
        first = self.layers[0]
        if first.training or src.dim() != 3 or src_key_padding_mask is None or mask is not None:
            return False
        if src.is_nested or torch.is_autocast_enabled() or (src.device.type != "cpu" and src.device.type != "cuda"):
            return False
        if src_key_padding_mask.dtype == torch.bool:
            keep = src_key_padding_mask.logical_not()
        else:
            keep = src_key_padding_mask == 0  # torch: float mask → bool via -inf; 0 = keep
        if self.mask_check:
            if not torch.jit.is_scripting():
                if torch.compiler.is_compiling():
                    return False
            if not _left_aligned(keep):
                return False
        if torch.is_grad_enabled():
            # torch's list: the input and the first layer's projection, norm and linear parameters.
            attn = first.self_attn
            tensors: List[Optional[Tensor]] = [
                src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias,
            ]
            for t in tensors:
                if t is not None and t.requires_grad:
                    return False
        return True


class TransformerDecoder(nn.Module):
    r"""A stack of ``num_layers`` copies of ``decoder_layer`` (+ optional final ``norm``).

    ``torch.nn.TransformerDecoder``'s drop-in: ``forward(tgt, memory, tgt_mask=None,
    memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
    tgt_is_causal=None, memory_is_causal=False)``.
    """

    __constants__ = ["norm"]

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: Optional[bool] = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        r"""Pass the inputs (and masks) through the decoder layers in turn, then ``norm`` (if any).

        Args:
            tgt: the sequence to the decoder: ``(T, B, E)``, ``(B, T, E)`` if ``batch_first``, or
                unbatched ``(T, E)``.
            memory: the sequence from the last layer of the encoder: ``(S, B, E)``, ``(B, S, E)`` or ``(S, E)``.
            tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, memory_is_causal:
                as :meth:`TransformerDecoderLayer.forward`.
            tgt_is_causal: hint that ``tgt_mask`` is the causal mask; ``None`` (default) detects it, as torch.

        Returns:
            ``tgt``'s shape.

        Raises:
            :class:`~fastformer.ops.errors.MultiheadAttentionDtypeError` for a ``tgt_mask`` that is
            neither bool nor floating; otherwise as :meth:`TransformerDecoderLayer.forward`.
        """
        _check_mask_dtype(tgt_mask, "tgt_mask")
        output = tgt
        tgt_is_causal = _detect_is_causal_mask(tgt_mask, tgt_is_causal, _seq_len(tgt, self.layers[0].self_attn.batch_first))
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(nn.Module):
    r"""Encoder-decoder transformer, ``torch.nn.Transformer``'s drop-in (same arguments,
    defaults, ``state_dict`` keys and initialisation: Xavier-uniform on every matrix).

    Forward: ``src`` ``(S, B, E)`` / ``(B, S, E)``, ``tgt`` ``(T, B, E)`` / ``(B, T, E)``,
    masks as in the layers; returns ``tgt``'s shape.
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
        custom_encoder: Optional[Any] = None,
        custom_decoder: Optional[Any] = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(*layer_args, **factory_kwargs),
                num_encoder_layers,
                make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs),
            )
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(*layer_args, **factory_kwargs),
                num_decoder_layers,
                make_layer_norm(d_model, layer_norm_eps, bias, **factory_kwargs),
            )
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_mask: Optional[Tensor] = None,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        src_is_causal: Optional[bool] = None,
        tgt_is_causal: Optional[bool] = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        r"""Encode ``src``, then decode ``tgt`` against the encoder's output, as ``torch.nn.Transformer``.

        Args:
            src: the sequence to the encoder: ``(S, B, E)``, ``(B, S, E)`` if ``batch_first``, or
                unbatched ``(S, E)``.
            tgt: the sequence to the decoder: ``(T, B, E)``, ``(B, T, E)`` if ``batch_first``, or
                unbatched ``(T, E)``.
            src_mask: ``(S, S)`` or ``(B·nhead, S, S)``.
            tgt_mask: ``(T, T)`` or ``(B·nhead, T, T)``.
            memory_mask: ``(T, S)`` or ``(B·nhead, T, S)``.
            src_key_padding_mask: ``(B, S)`` (``(S,)`` unbatched).
            tgt_key_padding_mask: ``(B, T)`` (``(T,)`` unbatched).
            memory_key_padding_mask: ``(B, S)`` (``(S,)`` unbatched).
            src_is_causal, tgt_is_causal: hints that ``src_mask`` / ``tgt_mask`` is the causal mask;
                ``None`` (default) detects it.
            memory_is_causal: hint that ``memory_mask`` is the causal mask.

        Masks as torch's: bool ``True`` = *not* allowed to attend (the opposite of SDPA's
        ``attn_mask``) or, for padding masks, ignore that key; a float mask is added to the scores.

        Returns:
            ``(T, B, E)``, ``(B, T, E)`` if ``batch_first``, or ``(T, E)``.

        Raises:
            ``RuntimeError`` when ``src`` and ``tgt`` differ in batch size or their last dim is not
            ``d_model``; otherwise as the encoder's and decoder's ``forward``.
        """
        is_batched = src.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if is_batched and src.size(batch_dim) != tgt.size(batch_dim):
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )

    @staticmethod
    def generate_square_subsequent_mask(
        sz: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        """``(sz, sz)`` float causal mask: ``-inf`` above the diagonal, ``0`` elsewhere."""
        return generate_square_subsequent_mask(sz, device=device, dtype=dtype)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
