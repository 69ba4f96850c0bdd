"""The variant kernels (issue 18) called directly: window, ALiBi, soft-cap; dense fwd + bwd
on the CPU (C++) and Triton (interpreter) kernels, and the decode kernel with a
paged cache. Each against the float64 reference built from an explicit mask and bias
(tests/variant_reference.py), under the error rule (PyTorch's error = the same explicit
math in the kernel's dtype)."""

from __future__ import annotations

import pytest
import torch

from attention_cases import require_backend
from error_rule import assert_close_by_rule
from fastformer.ops.attention.variants import Variant
from variant_reference import reference_attention

# (id, L, S, window, causal, bottom_right, alibi, softcap, mask, Hq, Hkv, dropout)
KERNEL_CASES = [
    ("window_causal", 37, 37, (5, -1), True, False, False, 0.0, None, 2, 1, 0.0),
    ("window_both_br", 37, 45, (7, 3), False, True, False, 0.0, None, 2, 2, 0.0),
    ("window_Lq>Lk", 50, 20, (4, 2), False, False, False, 0.0, None, 2, 1, 0.0),
    ("window_zero", 33, 33, (0, 0), False, False, False, 0.0, None, 2, 2, 0.0),
    ("window_right_only", 30, 40, (-1, 2), False, True, False, 0.0, None, 2, 2, 0.0),
    ("alibi", 21, 29, (-1, -1), False, False, True, 0.0, None, 4, 2, 0.0),
    ("alibi_causal_br", 19, 40, (-1, -1), True, True, True, 0.0, None, 2, 1, 0.0),
    ("softcap", 33, 41, (-1, -1), False, False, False, 2.0, None, 2, 1, 0.0),
    ("all_causal", 45, 45, (9, -1), True, False, True, 1.5, None, 4, 2, 0.0),
    ("all_bool_mask", 40, 50, (6, 2), False, True, True, 2.0, "bool", 2, 1, 0.0),
    ("all_float_mask", 26, 31, (8, 8), False, False, True, 3.0, "float", 2, 2, 0.0),
    ("all_dropout", 29, 29, (6, 0), False, False, True, 2.5, None, 2, 1, 0.3),
    ("long_window", 70, 70, (20, 0), False, False, False, 0.0, None, 1, 1, 0.0),
]

KERNEL_BACKENDS = [("cpu", torch.float32, "cpu"), ("cpu", torch.bfloat16, "cpu"),
                   ("triton", torch.float32, "cpu"), ("triton", torch.float16, "cpu"),
                   # compiled Triton on a GPU (bf16 only there: the interpreter's bf16 dot is wrong)
                   pytest.param("triton", torch.float16, "cuda", marks=pytest.mark.cuda),
                   pytest.param("triton", torch.bfloat16, "cuda", marks=pytest.mark.cuda)]


def _kernels(backend):
    """(forward, backward, keep_mask) with the old fused-kernel signatures, over the raw kernels."""
    if backend == "cpu":
        from fastformer._ext import C
        from fastformer.ops.attention.cpu import dropout_keep_mask

        def fwd(q, k, v, mask, rng, p, causal, br, scale, variant):
            out, lse = q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty(q.shape[:-1], device=q.device)
            seed, off = (int(x) for x in rng.tolist()) if rng is not None else (0, 0)
            C.attention_cpu_forward(q, k, v, mask, p, seed, off, causal, br, scale, out, lse, variant.window_left,
                                    variant.window_right, variant.alibi_slopes, variant.softcap)
            return out, lse

        def bwd(dout, q, k, v, out, lse, mask, rng, p, causal, br, scale, variant):
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            seed, off = (int(x) for x in rng.tolist()) if rng is not None else (0, 0)
            C.attention_cpu_backward(dout, q, k, v, out, lse, mask, p, seed, off, causal, br, scale, dq, dk, dv,
                                     variant.window_left, variant.window_right, variant.alibi_slopes, variant.softcap)
            return dq, dk, dv
        return fwd, bwd, dropout_keep_mask
    from fastformer.kernels.attention_bwd import attention_bwd
    from fastformer.kernels.attention_common import dropout_keep_mask
    from fastformer.kernels.attention_fwd import attention_fwd

    def fwd(q, k, v, mask, rng, p, causal, br, scale, variant):
        out, lse = q.new_empty(*q.shape[:-1], v.shape[-1]), torch.empty(q.shape[:-1], device=q.device)
        attention_fwd(q, k, v, mask, out, lse, rng, scale=scale, dropout_p=p, is_causal=causal,
                      causal_bottom_right=br, variant=variant)
        return out, lse

    def bwd(dout, q, k, v, out, lse, mask, rng, p, causal, br, scale, variant):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_bwd(dout, q, k, v, out, lse, mask, rng, dq, dk, dv, torch.empty_like(lse), scale=scale,
                      dropout_p=p, is_causal=causal, causal_bottom_right=br, variant=variant)
        return dq, dk, dv
    return fwd, bwd, dropout_keep_mask


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("backend,dtype,device", KERNEL_BACKENDS, ids=lambda x: str(x).split(".")[-1])
def test_variant_kernel_forward_backward(backend, dtype, device, case):
    require_backend(backend)
    _check_kernel_case(backend, dtype, device, case)


# Many tiles per row and column: with small blocks the window's tile skipping (first key
# tile of a query block, last query row of a key tile) runs in the fp32 and bf16 kernels.
TILED_CASES = [
    ("tiled_window", 150, 150, (23, 4), False, False, False, 0.0, None, 2, 1, 0.0),
    ("tiled_window_causal_alibi_softcap", 131, 131, (37, -1), True, False, True, 2.0, None, 2, 2, 0.0),
    ("tiled_window_br", 97, 160, (30, 0), False, True, True, 0.0, None, 2, 1, 0.0),
]


@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda x: str(x).split(".")[-1])
def test_cpu_kernel_window_tile_skipping(monkeypatch, dtype, case):
    require_backend("cpu")
    monkeypatch.setenv("FASTFORMER_CPU_ATTN_BQ", "10")
    monkeypatch.setenv("FASTFORMER_CPU_ATTN_BK", "16")  # rounded up to the micro-kernel's width
    _check_kernel_case("cpu", dtype, "cpu", case)


def _check_kernel_case(backend, dtype, device, case):
    _, L, S, window, causal, br, alibi, softcap, mask_kind, Hq, Hkv, p = case
    B, E = 2, 16
    fwd, bwd, keep_fn = _kernels(backend)
    q64, k64, v64 = (torch.randn(B, h, n, E, dtype=torch.float64) for h, n in ((Hq, L), (Hkv, S), (Hkv, S)))
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    slopes = torch.rand(B, Hq) * 0.5 if alibi else None
    mask = None
    if mask_kind is not None:
        keep = torch.rand(L, S) > 0.25
        mask = keep if mask_kind == "bool" else torch.randn(L, S).masked_fill(~keep, float("-inf")).to(dtype)
    mask4 = None if mask is None else mask.expand(B, Hq, L, S)
    rng = torch.tensor([1234, 5], dtype=torch.int64) if p > 0 else None
    dev = torch.device(device)  # inputs and the reference are drawn on the CPU; the kernel runs on `device`
    var = Variant(window[0], window[1], None if slopes is None else slopes.to(dev), softcap)
    scale = E ** -0.5
    qd, kd, vd = (t.to(dev) for t in (q, k, v))
    mask4d = None if mask4 is None else mask4.to(dev)
    rngd = None if rng is None else rng.to(dev)
    out, lse = fwd(qd, kd, vd, mask4d, rngd, p, causal, br, scale, variant=var)
    keep = keep_fn(rngd, (B, Hq, L, S), p, dev).cpu() if p > 0 else None

    kw = dict(is_causal=causal, bottom_right=br, window=window, alibi_slopes=slopes, softcap=softcap, keep=keep,
              dropout_p=p)
    up = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
    same = [t.clone().requires_grad_(True) for t in (q, k, v)]
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref, ref_lse = reference_attention(*up, attn_mask=m64, **kw)
    ref_same, _ = reference_attention(*same, attn_mask=mask, **kw)
    name = f"{backend}-{device}/{case[0]}"
    out, lse = out.cpu(), lse.cpu()
    assert_close_by_rule(out, ref, ref_same, name=f"{name}/out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{name}: rows seeing no key differ"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], rtol=0, atol=2e-5 if dtype == torch.float32 else 2e-2)

    dout64 = torch.randn_like(ref)
    dq, dk, dv = (g.cpu() for g in bwd(dout64.to(dtype).to(dev), qd, kd, vd, out.to(dev), lse.to(dev), mask4d, rngd, p,
                                       causal, br, scale, variant=var))
    g_ref = torch.autograd.grad(ref, up, dout64)
    g_same = torch.autograd.grad(ref_same, same, dout64.to(dtype))
    for gname, a, r, s in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_same):
        assert_close_by_rule(a, r, s, name=f"{name}/{gname}")


def _page(k, v, block_size, extra=3):
    B, Hkv, S, D = k.shape
    nb = S // block_size
    perm = torch.randperm(B * nb + extra)[: B * nb]
    pk = torch.randn(B * nb + extra, block_size, Hkv, D)
    pv = torch.randn(B * nb + extra, block_size, Hkv, v.shape[-1])
    pk[perm] = k.view(B, Hkv, nb, block_size, D).permute(0, 2, 3, 1, 4).reshape(-1, block_size, Hkv, D)
    pv[perm] = v.view(B, Hkv, nb, block_size, -1).permute(0, 2, 3, 1, 4).reshape(-1, block_size, Hkv, v.shape[-1])
    return pk, pv, perm.view(B, nb).to(torch.int32)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("window,causal,alibi,softcap", [
    ((-1, -1), True, False, 0.0), ((5, 0), True, False, 0.0), ((7, -1), True, True, 2.0), ((4, 3), False, True, 0.0),
    ((-1, -1), False, False, 1.5),
], ids=["causal", "window", "window_alibi_softcap", "window_noncausal_alibi", "softcap_noncausal"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_decode_kernel_variants(device, paged, window, causal, alibi, softcap):
    require_backend("triton")
    from fastformer.kernels.decode import decode_attention_fwd

    B, Hq, Hkv, S, D, Lq, bs, splits = 3, 4, 2, 64, 16, 2, 16, 3
    k, v, q = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hq, Lq, D)
    lens = torch.tensor([37, 64, 6], dtype=torch.int32)
    slopes = torch.rand(B, Hq) if alibi else None
    out = torch.empty(B, Hq, Lq, D)
    lse = torch.empty(B, Hq, Lq)
    o_part, lse_part = torch.empty(B, Hq, Lq, splits, D), torch.empty(B, Hq, Lq, splits)
    caches = _page(k, v, bs) if paged else (k, v, None)
    dev = torch.device(device)
    on = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    out_d, lse_d = on(out), on(lse)
    decode_attention_fwd(on(q), on(caches[0]), on(caches[1]), on(lens), D ** -0.5, causal, out_d, lse_d, on(o_part),
                         on(lse_part), splits, block_n=16, window=window, alibi_slopes=on(slopes), softcap=softcap,
                         block_table=on(caches[2]))
    out, lse = out_d.cpu(), lse_d.cpu()
    for b in range(B):
        n = int(lens[b])
        # the new tokens are the last Lq of the n valid entries: bottom-right alignment
        ref, ref_lse = reference_attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                           is_causal=causal, bottom_right=True, window=window,
                                           alibi_slopes=None if slopes is None else slopes[b:b + 1], softcap=softcap)
        torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=0, atol=2e-5)
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[b:b + 1][fin].double(), ref_lse[fin], rtol=0, atol=2e-5)
