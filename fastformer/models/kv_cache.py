"""Old import path of :class:`fastformer.nn.KVCache`."""

from ..nn.kv_cache import KVCache

__all__ = ["KVCache"]
