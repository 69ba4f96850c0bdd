"""``fastformer.nn.convert`` (also ``fastformer.convert``): swap a model's torch.nn transformer modules for fastformer's.

    model, report = fastformer.convert(model)            # a converted copy
    model, report = fastformer.convert(model, inplace=True)
    print(report)                                        # what was swapped, what was not and why

Swapped (exact types only — a subclass may override ``forward``, so it is left
alone and reported, while its children are still converted):
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``/``DecoderLayer``,
``nn.TransformerEncoder``/``Decoder``, ``nn.Transformer``, ``nn.LayerNorm`` and
``nn.RMSNorm`` (fastformer's fused-norm subclasses of them), plus what integrations register
(timm's ``Attention``: :mod:`fastformer.integrations.timm`).

The new modules *adopt* the old modules' Parameter and buffer objects (no copy):
weights, device, dtype and ``requires_grad`` stay, and an optimizer built on the
old model keeps working with ``inplace=True``. Each new module takes the
train/eval mode of the module it replaces. Modules with hooks, on themselves or on
a submodule the swap would rebuild, are skipped (their hooks would be lost).

Why a ``(model, report)`` pair rather than an attribute on the model: the report
is plain data about one call, and attaching it would leak into the model's
attributes (and pickles).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from .activation import MultiheadAttention
from .attention import Attention
from .layernorm import LayerNorm, RMSNorm
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = ["convert", "ConversionReport", "register_converter"]

# old type -> function(old module) -> new module with the old module's tensors adopted.
_CONVERTERS: Dict[Type[nn.Module], Callable[[nn.Module], nn.Module]] = {}


def register_converter(cls: Type[nn.Module], fn: Callable[[nn.Module], nn.Module]) -> None:
    """Teach :func:`convert` to swap modules of exactly type ``cls`` with ``fn(module)``."""
    _CONVERTERS[cls] = fn


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``swapped`` ``(name, old type, new type)`` and ``skipped`` ``(name, reason)``."""

    swapped: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        """``{old type name: number swapped}``."""
        out: Dict[str, int] = {}
        for _, old, _ in self.swapped:
            out[old] = out.get(old, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"fastformer.convert: swapped {len(self.swapped)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {name or '<root>'}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  skipped {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tensor adoption


def _adopt_tensors(new: nn.Module, old: nn.Module) -> None:
    """Make ``new`` own exactly ``old``'s Parameter and buffer objects, by name."""
    old_params = dict(old.named_parameters(remove_duplicate=False))
    new_params = dict(new.named_parameters(remove_duplicate=False))
    old_buffers = dict(old.named_buffers(remove_duplicate=False))
    new_buffers = dict(new.named_buffers(remove_duplicate=False))
    if old_params.keys() != new_params.keys() or old_buffers.keys() != new_buffers.keys():
        missing = sorted((old_params.keys() | old_buffers.keys()) ^ (new_params.keys() | new_buffers.keys()))
        raise ValueError(f"parameter names differ: {missing}")
    for name, p in old_params.items():
        if new_params[name].shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(new_params[name].shape)} != {tuple(p.shape)}")
        owner, leaf = _owner(new, name)
        setattr(owner, leaf, p)
    for name, b in old_buffers.items():
        owner, leaf = _owner(new, name)
        owner.register_buffer(leaf, b, persistent=leaf not in getattr(owner, "_non_persistent_buffers_set", ()))


def _owner(root: nn.Module, dotted: str) -> Tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def _copy_modes(new: nn.Module, old: nn.Module) -> None:
    """Train/eval flag of every module, matched by name (new submodules take their parent's)."""
    old_modes = {name: m.training for name, m in old.named_modules()}
    new.train(old.training)
    for name, m in new.named_modules():
        if name in old_modes:
            m.training = old_modes[name]


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating or initialising its tensors (they are adopted next)."""
    with torch.device("meta"):
        return build()


# ----------------------------------------------------------------------------- per-type converters


def _convert_mha(old: nn.MultiheadAttention) -> MultiheadAttention:
    new = _on_meta(
        lambda: MultiheadAttention(
            old.embed_dim,
            old.num_heads,
            dropout=old.dropout,
            bias=old.in_proj_bias is not None,
            add_bias_kv=old.bias_k is not None,
            add_zero_attn=old.add_zero_attn,
            kdim=old.kdim,
            vdim=old.vdim,
            batch_first=old.batch_first,
        )
    )
    _adopt_tensors(new, old)
    return new


def _layer_kwargs(old: nn.Module) -> Dict[str, object]:
    return dict(
        d_model=old.self_attn.embed_dim,
        nhead=old.self_attn.num_heads,
        dim_feedforward=old.linear1.out_features,
        dropout=old.dropout.p,
        activation=old.activation,
        layer_norm_eps=old.norm1.eps,
        batch_first=old.self_attn.batch_first,
        norm_first=old.norm_first,
        bias=old.linear1.bias is not None,
    )


def _check_layer_parts(old: nn.Module, norms: Tuple[str, ...], attns: Tuple[str, ...]) -> None:
    """Our layers assume torch's parts; refuse (→ skip, children still converted) when a part was replaced."""
    for name in attns:
        if type(getattr(old, name)) is not nn.MultiheadAttention:
            raise ValueError(f"{name} is {type(getattr(old, name)).__name__}, not nn.MultiheadAttention")
    for name in norms:
        if type(getattr(old, name)) is not nn.LayerNorm:
            raise ValueError(f"{name} is {type(getattr(old, name)).__name__}, not nn.LayerNorm")
    for name in ("linear1", "linear2"):
        # Exact type: the fused feed-forward reads the weights, so a subclass's forward (a LoRA
        # wrapper, say) would never run.
        if type(getattr(old, name)) is not nn.Linear:
            raise ValueError(f"{name} is {type(getattr(old, name)).__name__}, not nn.Linear")


def _copy_dropouts(new: nn.Module, old: nn.Module, names: Tuple[str, ...]) -> None:
    for name in names:
        getattr(new, name).p = getattr(old, name).p


def _convert_encoder_layer(old: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
    _check_layer_parts(old, ("norm1", "norm2"), ("self_attn",))
    new = _on_meta(lambda: TransformerEncoderLayer(**_layer_kwargs(old)))
    _adopt_tensors(new, old)
    _copy_dropouts(new, old, ("dropout", "dropout1", "dropout2"))
    new.self_attn.dropout = old.self_attn.dropout
    return new


def _convert_decoder_layer(old: nn.TransformerDecoderLayer) -> TransformerDecoderLayer:
    _check_layer_parts(old, ("norm1", "norm2", "norm3"), ("self_attn", "multihead_attn"))
    new = _on_meta(lambda: TransformerDecoderLayer(**_layer_kwargs(old)))
    _adopt_tensors(new, old)
    _copy_dropouts(new, old, ("dropout", "dropout1", "dropout2", "dropout3"))
    new.self_attn.dropout = old.self_attn.dropout
    new.multihead_attn.dropout = old.multihead_attn.dropout
    return new


def _shell(cls: Type[nn.Module], **attrs) -> nn.Module:
    """An instance of a container ``cls`` whose submodules/attributes are given, not built."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def _convert_encoder(old: nn.TransformerEncoder) -> TransformerEncoder:
    # Layers and norm are converted afterwards by the walk (they are children of the shell).
    return _shell(
        TransformerEncoder,
        layers=old.layers,
        num_layers=old.num_layers,
        norm=old.norm,
        enable_nested_tensor=old.enable_nested_tensor,
        use_nested_tensor=getattr(old, "use_nested_tensor", False),
        mask_check=getattr(old, "mask_check", True),
    )


def _convert_decoder(old: nn.TransformerDecoder) -> TransformerDecoder:
    return _shell(TransformerDecoder, layers=old.layers, num_layers=old.num_layers, norm=old.norm)


def _convert_transformer(old: nn.Transformer) -> Transformer:
    return _shell(
        Transformer,
        encoder=old.encoder,
        decoder=old.decoder,
        d_model=old.d_model,
        nhead=old.nhead,
        batch_first=old.batch_first,
    )


def _convert_layer_norm(old: nn.LayerNorm) -> nn.Module:
    new = _on_meta(
        lambda: LayerNorm(
            old.normalized_shape,
            eps=old.eps,
            elementwise_affine=old.elementwise_affine,
            bias=getattr(old, "bias", None) is not None,
        )
    )
    _adopt_tensors(new, old)
    return new


def _convert_rms_norm(old: nn.Module) -> nn.Module:
    new = _on_meta(lambda: RMSNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine))
    _adopt_tensors(new, old)
    return new


register_converter(nn.MultiheadAttention, _convert_mha)
register_converter(nn.TransformerEncoderLayer, _convert_encoder_layer)
register_converter(nn.TransformerDecoderLayer, _convert_decoder_layer)
register_converter(nn.TransformerEncoder, _convert_encoder)
register_converter(nn.TransformerDecoder, _convert_decoder)
register_converter(nn.Transformer, _convert_transformer)
register_converter(nn.LayerNorm, _convert_layer_norm)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_converter(nn.RMSNorm, _convert_rms_norm)

# Our containers are swapped in as shells holding the old children, which the walk converts next.
_CONTAINERS = (TransformerEncoder, TransformerDecoder, Transformer)


def _has_hooks(m: nn.Module) -> bool:
    return any(
        len(getattr(m, attr, ()))
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def convert_timm_attention(old: nn.Module) -> Attention:
    """Our :class:`~fastformer.nn.Attention` sharing ``old``'s submodules (timm ``Attention``; nothing copied)."""
    new = Attention.__new__(Attention)
    nn.Module.__init__(new)
    for attr in ("num_heads", "head_dim", "attn_dim", "scale"):
        setattr(new, attr, getattr(old, attr) if hasattr(old, attr) else None)
    if new.attn_dim is None:  # older timm: no attn_dim
        new.attn_dim = new.num_heads * new.head_dim
    for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
        child = getattr(old, name, None)
        setattr(new, name, child if child is not None else nn.Identity())
    return new


_TIMM_REGISTERED = False


def _register_timm() -> None:
    global _TIMM_REGISTERED
    _TIMM_REGISTERED = True
    try:
        from timm.layers import Attention as TimmAttention
    except Exception:  # timm absent or too old: nothing to convert
        return
    register_converter(TimmAttention, convert_timm_attention)


def _load_integrations() -> None:
    """Integrations register converters for their library's modules when that library is in use."""
    import sys

    if "timm" in sys.modules and not _TIMM_REGISTERED:
        _register_timm()


def _swap(module: nn.Module, name: str, report: ConversionReport) -> Optional[nn.Module]:
    """The replacement for ``module`` (or None to keep it), recording why."""
    cls = type(module)
    fn = _CONVERTERS.get(cls)
    if fn is None:
        base = next((c for c in _CONVERTERS if isinstance(module, c)), None)
        if base is not None:
            report.skipped.append((name, f"{cls.__name__} subclasses {base.__name__} (its forward may differ)"))
        return None
    # Converters that rebuild their submodules would drop hooks registered on any of them; the
    # container shells and timm's Attention keep the old children (and their hooks) instead.
    keeps_children = fn in (_convert_encoder, _convert_decoder, _convert_transformer, convert_timm_attention)
    hooked = [n for n, m in (((name, module),) if keeps_children else module.named_modules(prefix=name))
              if _has_hooks(m)]
    if hooked:
        where = "" if hooked == [name] else f" (on {', '.join(hooked)})"
        report.skipped.append((name, f"{cls.__name__} has hooks{where}, which a swap would drop"))
        return None
    try:
        new = fn(module)
    except (ImportError, ValueError, AttributeError) as exc:
        report.skipped.append((name, f"{cls.__name__}: {exc}"))
        return None
    _copy_modes(new, module)
    report.swapped.append((name, f"{cls.__module__}.{cls.__qualname__}", f"{type(new).__module__}.{type(new).__qualname__}"))
    return new


def _walk(module: nn.Module, prefix: str, report: ConversionReport) -> nn.Module:
    for child_name, child in list(module.named_children()):
        full = f"{prefix}.{child_name}" if prefix else child_name
        new = _swap(child, full, report)
        if new is not None:
            setattr(module, child_name, new)
            child = new
        if new is None or isinstance(child, _CONTAINERS):
            _walk(child, full, report)
    return module


def convert(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, ConversionReport]:
    """Swap torch.nn transformer modules in ``model`` for fastformer's drop-ins.

    Args:
        model: any ``nn.Module`` (the root itself is swapped too if it is one of the types).
        inplace: modify ``model`` itself; otherwise a deep copy is converted and
            ``model`` is untouched.

    Returns:
        ``(converted model, ConversionReport)``; ``print(report)`` lists every swap and skip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _load_integrations()
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    root = _swap(model, "", report)
    if root is not None:
        model = root
        if not isinstance(model, _CONTAINERS):
            return model, report
    return _walk(model, "", report), report
