"""Old import path of :mod:`fastformer.ops.attention.decode`, kept so existing code importing
``fastformer.ops.decode_attention.use_decode_backend`` keeps working."""

from .attention.decode import decode_attention, use_decode_backend

__all__ = ["decode_attention", "use_decode_backend"]
