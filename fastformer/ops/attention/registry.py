"""The one attention backend registry: what exists, what is available here, which one runs.

Dense, packed variable-length and decode attention all choose their backend
here. A backend is an :class:`AttentionBackend`: a name, a check of whether it
can run on this machine at all (``availability``), a check of whether it
supports a given problem (``unsupported``), and what it implements:

* fused kernels, plain functions the custom ops of ``fused.py`` call:
  ``forward``/``backward`` (dense), ``varlen_forward``/``varlen_backward``
  (packed), ``decode_forward`` (KV cache); their contracts are in ``fused.py``;
* or ``run(problem) -> out``, a differentiable implementation of its own (the
  torch ``"reference"`` backend) for the kinds listed in ``run_kinds``.

Backends register themselves with :func:`register_backend` when their module is
imported; the modules in ``_BACKEND_MODULES`` are imported lazily and all at
once when fastformer is imported (:func:`load_all_backends`), so a missing
Triton, extension or GPU never breaks ``import fastformer``.

``"auto"`` tries :data:`AUTO_ORDER` (dense; :data:`VARIANT_AUTO_ORDER` for dense
problems with a window, ALiBi or a soft-cap), :data:`VARLEN_AUTO_ORDER` or
:data:`DECODE_AUTO_ORDER` for the device type and falls back to ``"reference"``,
which handles every valid input. A backend that is not the fastest everywhere
narrows where ``auto`` picks it with ``auto_policy``. A backend asked for by name raises a clear
error instead of falling back: ``RuntimeError`` when it cannot run here at all,
``ValueError`` when it does not support the inputs.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

BACKEND_NAMES = ("auto", "reference", "naive", "triton", "cuda", "cpu")
KINDS = ("dense", "varlen", "decode")

# Fastest first. "naive" is a baseline and never picked automatically.
AUTO_ORDER: Dict[str, List[str]] = {
    # CUDA tensors go to torch's SDPA (flash / cuDNN): on an H200 (GPU run 1, bench/results/nvidia-h200/)
    # our Triton kernels ran at 0.58-0.87x and the CUDA kernels at 0.33-0.61x of torch's best backend on
    # every bf16 row, and "auto" never picks a backend slower than torch's. Forced backends still run.
    "cuda": [],
    "cpu": ["cpu"],
}
# Dense problems with a window, ALiBi or a soft-cap: torch's SDPA runs none of them (the
# reference backend would run them as explicit math, memory ~ L·S, no tile skipping), so
# "auto" takes the fused backends that run them natively: on CUDA the Triton kernels (their
# variant tests passed compiled on an H200 in fp16/bf16, fwd + bwd, and under
# compute-sanitizer: bench/NOTES.md, GPU runs 3+4); on CPU the C++ kernels, whatever the
# plain-attention policy table says (cpu.auto_prefers_cpu). The "cuda" backend refuses them.
VARIANT_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton"],
    "cpu": ["cpu"],
}
VARLEN_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton"],
}
# Decoding takes the Triton kernels on CPU tensors too when TRITON_INTERPRET=1 (how tests run them).
DECODE_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton"],
    "cpu": ["triton"],
}
_AUTO_ORDERS = {"dense": AUTO_ORDER, "varlen": VARLEN_AUTO_ORDER, "decode": DECODE_AUTO_ORDER}

# Importing these modules registers the backend. A module that fails to import
# makes its backend unavailable, with the import error as the reason.
_BACKEND_MODULES: Dict[str, str] = {
    "reference": "fastformer.ops.attention.reference",
    "naive": "fastformer.ops.attention.naive",
    "triton": "fastformer.ops.attention.triton",
    "cuda": "fastformer.ops.attention.cuda",
    "cpu": "fastformer.ops.attention.cpu",
}


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str
    availability: Callable[[], Optional[str]]  # None when usable on this machine, else why not
    unsupported: Callable[[object], Optional[str]]  # None when it supports the problem, else why not
    run: Optional[Callable[[object], object]] = None  # differentiable run(problem) -> out, for run_kinds
    auto: bool = True  # may "auto" pick it (a kernel never validated on hardware must not)
    forward: Optional[Callable] = None  # fused dense kernels (contract: fused.py)
    backward: Optional[Callable] = None
    varlen_forward: Optional[Callable] = None  # fused packed kernels
    varlen_backward: Optional[Callable] = None
    decode_forward: Optional[Callable] = None  # KV-cache kernel (inference only)
    run_kinds: Tuple[str, ...] = ("dense",)
    # The dense forward takes ``out=`` and the backward ``grads=(dq, dk, dv)`` to write in place,
    # in any layout with a unit last stride (fused.run_qkvpacked: FlashAttention's (B, L, H, E)).
    strided_outputs: bool = False
    # Where "auto" may pick it, when it is not everywhere the fastest choice: None means
    # everywhere it supports; else True for the problems where it measured faster than
    # the fallback (the cpu backend's table from committed benchmarks, cpu.py).
    auto_policy: Optional[Callable[[object], bool]] = None
    # auto_policy for a plain dense problem given by its features alone, (dtype, needs_grad,
    # is_causal, head_dim, len_q, len_k) -> bool: lets the drop-in SDPA ask before building the
    # problem (auto_runs_torch). None: this backend can only decide from a problem object.
    shape_policy: Optional[Callable[..., bool]] = None

    def handles(self, kind: str) -> bool:
        """Whether this backend implements problems of ``kind`` at all."""
        if self.run is not None and kind in self.run_kinds:
            return True
        fused = {"dense": self.forward, "varlen": self.varlen_forward, "decode": self.decode_forward}
        return fused.get(kind) is not None


_REGISTRY: Dict[str, AttentionBackend] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_DEFAULT_STACK: List[str] = []  # use_backend (dense attention)
_DECODE_DEFAULT_STACK: List[str] = []  # use_decode_backend


def register_backend(backend: AttentionBackend) -> None:
    _REGISTRY[backend.name] = backend


def _load(name: str) -> Optional[AttentionBackend]:
    if name not in _BACKEND_MODULES:
        return None
    if name not in _REGISTRY and name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(_BACKEND_MODULES[name])
        except Exception as exc:  # any failure means "not available", with the reason
            _IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        if name not in _REGISTRY and name not in _IMPORT_ERRORS:
            _IMPORT_ERRORS[name] = f"module {_BACKEND_MODULES[name]} registered no backend"
    return _REGISTRY.get(name)


def get_backend(name: str) -> AttentionBackend:
    """The registered backend ``name`` (imported on first use); RuntimeError when it failed to load."""
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"attention backend {name!r} is not available: {_IMPORT_ERRORS.get(name, 'unknown name')}")
    return backend


def _why_unavailable(name: str) -> Optional[str]:
    backend = _load(name)
    if backend is None:
        return _IMPORT_ERRORS[name]
    return backend.availability()


def _check_name(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


@contextlib.contextmanager
def _pushed(stack: List[str], backend: str) -> Iterator[None]:
    _check_name(backend)
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def use_backend(backend: str):
    """Make ``backend`` the default dense attention backend inside a ``with`` block.

    Calls that pass ``backend="auto"`` (the default) use it instead; an explicit
    ``backend=`` argument still wins. Blocks nest. The setting is process-wide
    (not per thread), which keeps it visible to ``torch.compile``.
    """
    return _pushed(_DEFAULT_STACK, backend)


def use_decode_backend(backend: str):
    """Make ``backend`` what ``decode_attention(backend="auto")`` uses inside a ``with`` block
    (e.g. ``"reference"`` to decode with PyTorch under the interpreter). ``"torch"`` is
    accepted as another name for ``"reference"``."""
    return _pushed(_DECODE_DEFAULT_STACK, "reference" if backend == "torch" else backend)


def select_backend(problem, backend: str = "auto") -> AttentionBackend:
    """The backend that will run ``problem`` (any kind); see the module docstring for the rules."""
    _check_name(backend)
    kind = problem.kind
    stack = _DECODE_DEFAULT_STACK if kind == "decode" else _DEFAULT_STACK if kind == "dense" else ()
    if backend == "auto" and stack:
        backend = stack[-1]
    if backend != "auto":
        chosen = _load(backend)
        if chosen is not None and not chosen.handles(kind):
            raise ValueError(f"attention backend {backend!r} does not support these inputs: no {kind} attention")
        reason = _why_unavailable(backend)
        if reason is not None:
            raise RuntimeError(f"attention backend {backend!r} is not available: {reason}")
        chosen = _REGISTRY[backend]
        reason = chosen.unsupported(problem)
        if reason is not None:
            raise ValueError(f"attention backend {backend!r} does not support these inputs: {reason}")
        return chosen
    if kind == "dense" and problem.is_empty:
        return _load("reference")  # nothing to compute: torch's shapes and zeros, no kernel launch
    order = _AUTO_ORDERS[kind]
    if kind == "dense" and problem.options.variant_active:
        order = VARIANT_AUTO_ORDER
    for name in order.get(problem.q.device.type, []):
        if _why_unavailable(name) is None:
            candidate = _REGISTRY[name]
            if candidate.auto and candidate.handles(kind) and candidate.unsupported(problem) is None and (
                candidate.auto_policy is None or candidate.auto_policy(problem)
            ):
                return candidate
    return _load("reference")


def auto_runs_torch(device_type: str, dtype: torch.dtype, needs_grad: bool, is_causal: bool, head_dim: int,
                    len_q: int, len_k: int) -> bool:
    """True when ``auto`` certainly sends a plain dense problem (no mask, no window / ALiBi /
    soft-cap, no backend set by :func:`use_backend`) with these features to the ``reference``
    backend, i.e. to torch's own SDPA unchanged: every backend in :data:`AUTO_ORDER` for the
    device type is unavailable or declines by its ``shape_policy``. False when unsure."""
    if _DEFAULT_STACK:
        return False
    for name in AUTO_ORDER.get(device_type, []):
        if _why_unavailable(name) is not None:
            continue
        backend = _REGISTRY[name]
        if not backend.auto:
            continue
        if backend.shape_policy is None or backend.shape_policy(dtype, needs_grad, is_causal, head_dim, len_q, len_k):
            return False
    return True


def load_all_backends() -> None:
    """Import every backend module now (failures are recorded, never raised).

    Called when fastformer is imported, so that neither a first call nor a
    ``torch.compile`` trace ever has to import a module (dynamo cannot trace imports).
    """
    for name in _BACKEND_MODULES:
        _load(name)


class BackendReport(Dict[str, Dict[str, object]]):
    """What :func:`backends` returns: ``{name: {"available": bool, "auto": bool, "reason": str,
    "description": str}}``, a plain dict that prints as the table ``python -m fastformer.info`` shows."""

    def table(self) -> str:
        """One line per backend: available, picked by "auto", description or why it is unavailable."""
        lines = [f"{'backend':<10} {'available':<10} {'auto':<5} description / reason unavailable"]
        for name, info in self.items():
            text = info["description"] if info["available"] else info["reason"]
            lines.append(f"{name:<10} {'yes' if info['available'] else 'no':<10} {'yes' if info['auto'] else 'no':<5} {text}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()


def backends() -> BackendReport:
    """Every attention backend with whether it is available here and, if not, why.

    Returns a :class:`BackendReport`: ``{name: {"available": bool, "auto": bool, "reason": str,
    "description": str}}``, which prints as a table.
    """
    report = BackendReport()
    for name in BACKEND_NAMES[1:]:
        reason = _why_unavailable(name)
        backend = _REGISTRY.get(name)
        report[name] = {
            "available": reason is None,
            "auto": bool(backend and backend.auto),
            "reason": reason or "",
            "description": backend.description if backend else "",
        }
    return report
