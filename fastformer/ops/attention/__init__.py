"""Attention ops as one package.

* ``problem.py``   inputs validated once into one problem object per kind (dense,
                   varlen, decode); :class:`AttentionOptions` carries everything
                   besides the tensors that decides the weights.
* ``registry.py``  the one backend registry (``auto`` order, ``use_backend``, the report).
* ``fused.py``     the ``torch.library`` custom ops the fused kernels plug into, and
                   ``run_problem``, the one place a chosen backend is run.
* ``dense.py``, ``qkvpacked.py``, ``varlen.py``, ``decode.py``   the public entry points.
* ``reference.py``, ``naive.py``, ``triton.py``, ``cuda.py``, ``cpu.py``   the backends
  (each registers itself; imported by :func:`load_all_backends`).

The Triton launch helpers live beside their kernels in ``fastformer.kernels``;
the backends allocate the outputs and call them.
"""

from .decode import decode_attention
from .dense import attention, scaled_dot_product_attention
from .problem import AttentionOptions, AttentionProblem, DecodeProblem, VarlenProblem
from .qkvpacked import attention_qkvpacked
from .registry import backends, load_all_backends, select_backend, use_backend, use_decode_backend
from .varlen import varlen_attention

__all__ = [
    "attention", "attention_qkvpacked", "scaled_dot_product_attention", "varlen_attention", "decode_attention", "backends",
    "use_backend", "use_decode_backend", "select_backend", "load_all_backends", "AttentionOptions",
    "AttentionProblem", "VarlenProblem", "DecodeProblem",
]
