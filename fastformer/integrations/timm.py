"""timm: a ViT attention layer on fastformer, and ``convert`` support for timm's ``Attention``.

    from fastformer.integrations.timm import Attention
    model = timm.models.vision_transformer.VisionTransformer(..., attn_layer=Attention)

    model, report = fastformer.convert(timm_model)   # swaps every timm Attention block

:class:`Attention` is :class:`fastformer.nn.Attention`: timm's ``Attention`` constructor and
submodules (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``, ``proj_drop``),
so pretrained ``state_dict`` s load unchanged. Nothing here imports timm; ``fastformer.convert``
registers :func:`convert_attention` for timm's ``Attention`` when timm is in use.
"""

from ..nn.attention import Attention
from ..nn.convert import convert_timm_attention as convert_attention

__all__ = ["Attention", "convert_attention"]
