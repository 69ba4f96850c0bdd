"""Triton kernels and their launch helpers (installed as ``fastformer.kernels``).

Nothing here knows about modules or autograd; ``fastformer.ops`` wraps them.
"""
