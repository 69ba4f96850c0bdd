"""Dropout checks shared by every attention backend.

A backend's dropout can't be compared with torch's (different random streams),
so the checks are (1) statistics of the dropped weights, (2) reproducibility
under ``torch.manual_seed``, and (3) given the backend's own keep-mask (from a
debug helper that regenerates it from the same ``rng_state``), output and
gradients against the float64 reference with that mask applied explicitly.
"""

from __future__ import annotations

import torch

import fastformer
from error_rule import assert_close_by_rule
from fastformer.ops.attention.fused import draw_rng_state


def dropout_statistics(backend: str, device, dtype=torch.float32, p: float = 0.3):
    """With V = I, the output *is* the dropped, rescaled attention matrix."""
    B, H, L, S = 2, 2, 48, 64
    q = torch.randn(B, H, L, 16, device=device, dtype=dtype)
    k = torch.randn(B, H, S, 16, device=device, dtype=dtype)
    v = torch.eye(S, device=device, dtype=dtype).expand(B, H, S, S).contiguous()
    out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend).float()
    zero_rate = (out == 0).float().mean().item()
    n = out.numel()
    tol = 5 * (p * (1 - p) / n) ** 0.5 + 2e-3
    assert abs(zero_rate - p) < tol, f"{backend}: dropped fraction {zero_rate:.4f}, expected {p} ± {tol:.4f}"
    # Each row of P sums to 1; kept weights are scaled by 1/(1-p), so row sums average 1.
    row_mean = out.sum(-1).mean().item()
    assert abs(row_mean - 1.0) < 0.03, f"{backend}: mean row sum {row_mean:.4f}, expected 1 (mean preserved)"


def dropout_reproducible(backend: str, device, dtype=torch.float32, p: float = 0.2):
    q, k, v = (torch.randn(1, 2, 20, 8, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def run(seed):
        torch.manual_seed(seed)
        out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return out.detach(), grads

    out1, g1 = run(7)
    out2, g2 = run(7)
    out3, _ = run(8)
    assert torch.equal(out1, out2), f"{backend}: dropout not reproducible under torch.manual_seed"
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), f"{backend}: dropout gradients not reproducible"
    assert not torch.equal(out1, out3), f"{backend}: different seeds gave the same dropout mask"


def dropout_matches_explicit_mask(backend: str, keep_mask_fn, device, dtype=torch.float32, p: float = 0.25,
                                  L: int = 19, S: int = 23, is_causal: bool = False):
    """Output and gradients equal the float64 reference with the backend's own keep-mask.

    ``keep_mask_fn(rng_state, shape, p, device) -> bool (B, H, L, S)`` must regenerate
    exactly the mask the backend's kernel applies for ``rng_state``.
    """
    B, H, E = 2, 2, 16
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64) for n in (L, S, S))
    q, k, v = (t.to(dtype).to(device).requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(1234)
    out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal, backend=backend)
    torch.manual_seed(1234)
    rng_state = draw_rng_state(p, q.device)
    keep = keep_mask_fn(rng_state, (B, H, L, S), p, q.device)

    def explicit(qq, kk, vv):
        s = (qq @ kk.transpose(-2, -1)) * E**-0.5
        if is_causal:
            s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        w = torch.softmax(s.float() if s.dtype != torch.float64 else s, dim=-1).to(s.dtype)
        return (w * keep / (1 - p)).to(vv.dtype) @ vv

    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    same = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref, ref_same = explicit(*up), explicit(*same)
    assert_close_by_rule(out, ref, ref_same, name=f"{backend}/dropout/out")
    dout = torch.randn_like(ref)
    g = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    g_ref = torch.autograd.grad(ref, up, dout)
    g_same = torch.autograd.grad(ref_same, same, dout.to(dtype))
    for name, a, r, s in zip(("dq", "dk", "dv"), g, g_ref, g_same):
        assert_close_by_rule(a, r, s, name=f"{backend}/dropout/{name}")


def dropout_all(backend: str, device, dtype=torch.float32):
    """dropout_p = 1 drops everything: zeros out, zero (finite) gradients, as torch."""
    q, k, v = (torch.randn(1, 2, 9, 8, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out, (q, k, v), torch.ones_like(out)):
        assert torch.isfinite(g).all() and torch.equal(g, torch.zeros_like(g))
