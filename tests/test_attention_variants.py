"""Attention variants (issue 18): sliding window, ALiBi, logit soft-cap, paged KV cache.

Output and every gradient of the dense backends are checked through the public API
on attention_cases.VARIANT_CASES (window / ALiBi / soft-cap, alone and with causal in
both alignments, masks, GQA, odd shapes) against a float64 reference built from an
explicit mask and bias (tests/variant_reference.py), under the error rule. Here also:
the argument checks, backend selection, the log-sum-exp, dropout with each backend's
own keep-mask, varlen and decode with the variants, and the paged KV cache.
"""

from __future__ import annotations

import pytest
import torch

import fastformer
from attention_cases import VARIANT_CASES, check_case, require_backend
from error_rule import assert_close_by_rule
from variant_reference import reference_attention

DENSE_BACKENDS = [("reference", torch.float32), ("naive", torch.float32), ("cpu", torch.float32),
                  ("cpu", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16)]


# (backend, dtype) on CPU tensors (Triton under the interpreter: fp32/fp16, its bf16 dot is unreliable);
# compiled Triton on a GPU where there is one.
API_COMBOS = [
    pytest.param("reference", "cpu", torch.float32, id="reference-fp32"),
    pytest.param("naive", "cpu", torch.float32, id="naive-fp32"),
    pytest.param("cpu", "cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", "cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("triton", "cpu", torch.float32, id="triton-interp-fp32"),
    pytest.param("triton", "cpu", torch.float16, id="triton-interp-fp16"),
    pytest.param("auto", "cpu", torch.float32, id="auto-fp32"),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("auto", "cuda", torch.float16, id="auto-cuda-fp16", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend,device,dtype", API_COMBOS)
def test_variant_matches_explicit_reference(backend, device, dtype, case):
    """Output and dq, dk, dv of every backend vs the float64 explicit mask/bias reference."""
    if backend != "auto":
        require_backend(backend)
    check_case(case, backend, dtype, device)


@pytest.mark.parametrize("case", [c for c in VARIANT_CASES if c.mask == "float"], ids=lambda c: c.id)
def test_reference_variants_float_mask_gradient(case):
    check_case(case, "reference", torch.float32, "cpu", mask_grad=True)


def _qkv(B=2, Hq=4, Hkv=2, L=23, S=29, E=16, dtype=torch.float32, grad=False):
    q = torch.randn(B, Hq, L, E, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, E, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, E, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


# ------------------------------------------------------------------------------------ arguments

@pytest.mark.parametrize("window, error", [
    ((-2, 0), ValueError), ((3,), TypeError), ("4", TypeError), ((1.5, 0), TypeError), ((True, 0), TypeError),
])
def test_window_size_is_checked(window, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="window_size"):
        fastformer.attention(q, k, v, enable_gqa=True, window_size=window)


@pytest.mark.parametrize("softcap, error", [(-1.0, ValueError), (float("nan"), ValueError),
                                            (float("inf"), ValueError), ("1", TypeError)])
def test_softcap_is_checked(softcap, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="softcap"):
        fastformer.attention(q, k, v, enable_gqa=True, softcap=softcap)


@pytest.mark.parametrize("slopes, error", [
    (torch.ones(4, dtype=torch.float64), TypeError),  # FlashAttention's contract: float32
    (torch.ones(3), ValueError),  # not (Hq,)
    (torch.ones(3, 4), ValueError),  # not (B, Hq)
    (torch.ones(2, 4, 1), ValueError),
    ([0.5] * 4, TypeError),
])
def test_alibi_slopes_are_checked(slopes, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="alibi_slopes"):
        fastformer.attention(q, k, v, enable_gqa=True, alibi_slopes=slopes)


def test_no_window_is_plain_attention_and_causal_is_a_window():
    q, k, v = _qkv(L=31, S=31)
    plain = fastformer.attention(q, k, v, enable_gqa=True, is_causal=True, backend="reference")
    same = fastformer.attention(q, k, v, enable_gqa=True, is_causal=True, window_size=(-1, -1), backend="reference")
    assert torch.equal(plain, same)
    for backend in ("cpu", "reference"):
        if not fastformer.backends()[backend]["available"]:
            continue
        a = fastformer.attention(q, k, v, enable_gqa=True, is_causal=True, backend=backend)
        b = fastformer.attention(q, k, v, enable_gqa=True, window_size=(-1, 0), backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_auto_handles_every_variant_on_cpu():
    q, k, v = _qkv()
    slopes = torch.rand(4)
    out = fastformer.attention(q, k, v, enable_gqa=True, window_size=(4, 1), alibi_slopes=slopes, softcap=2.0)
    ref, _ = reference_attention(*(t.double() for t in (q, k, v)), window=(4, 1), alibi_slopes=slopes, softcap=2.0)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ backend choice

def _problem(dtype=torch.float32, device="cpu", **variant):
    from fastformer.ops.attention.problem import validate_attention_inputs

    q = torch.randn(1, 4, 6, 16, dtype=dtype, device=device)
    return validate_attention_inputs(q, q, q, **variant)


@pytest.mark.parametrize("variant", [dict(window_size=(4, 0)), dict(alibi_slopes=torch.rand(4)), dict(softcap=5.0)],
                         ids=["window", "alibi", "softcap"])
def test_auto_takes_the_native_kernels_for_variants_on_cpu(variant):
    """Torch's SDPA runs no variant: auto picks the cpu kernels (whatever the plain-attention
    policy table says for this tiny shape), and reference for what they do not take (float64)."""
    from fastformer.ops.attention.registry import select_backend

    require_backend("cpu")
    assert select_backend(_problem(**variant)).name == "cpu"
    assert select_backend(_problem(torch.float64, **variant)).name == "reference"


def test_cuda_backend_refuses_variants_and_says_so():
    from types import SimpleNamespace

    from fastformer.ops.attention.cuda import _unsupported
    from fastformer.ops.attention.problem import AttentionOptions

    q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16)
    for opts in (AttentionOptions(window_left=3), AttentionOptions(softcap=2.0),
                 AttentionOptions(alibi_slopes=torch.rand(1, 4))):
        problem = SimpleNamespace(q=q, dropout_p=0.0, options=opts, mask_needs_grad=False, mask=None)
        assert "window_size / alibi_slopes / softcap" in _unsupported(problem)
    assert "window/ALiBi/soft-cap" in fastformer.backends()["cuda"]["description"] or \
        not fastformer.backends()["cuda"]["available"]


@pytest.mark.cuda
def test_auto_takes_triton_for_variants_on_cuda():
    from fastformer.ops.attention.registry import select_backend

    assert select_backend(_problem(torch.float16, "cuda", softcap=5.0)).name == "triton"
    assert select_backend(_problem(torch.float16, "cuda")).name == "reference"  # plain: torch's SDPA


def test_plain_options_take_no_variant_path():
    problem = _problem(window_size=(-1, -1), alibi_slopes=None, softcap=0.0)
    assert not problem.options.variant_active
    assert _problem(window_size=[-1, 0]).options.window_right == 0  # a list is accepted, as FlashAttention


# ------------------------------------------------------------------------------------ lse, dropout

@pytest.mark.parametrize("backend,dtype", DENSE_BACKENDS[1:], ids=lambda x: str(x).split(".")[-1])
def test_return_lse_with_variants(backend, dtype):
    require_backend(backend)
    q, k, v = _qkv(L=19, S=33, dtype=dtype)
    slopes = torch.rand(2, 4)
    kw = dict(window_size=(5, 2), alibi_slopes=slopes, softcap=3.0, causal_bottom_right=True)
    out, lse = fastformer.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend, **kw)
    ref_out, ref_lse = reference_attention(*(t.double() for t in (q, k, v)), bottom_right=True,
                                           window=(5, 2), alibi_slopes=slopes, softcap=3.0)
    same_out, same_lse = reference_attention(q, k, v, bottom_right=True, window=(5, 2), alibi_slopes=slopes,
                                             softcap=3.0)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert_close_by_rule(out, ref_out, same_out.to(dtype), name=f"{backend}/out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close_by_rule(lse[finite], ref_lse[finite], same_lse.float()[finite], name=f"{backend}/lse")


def _keep_mask_fn(backend):
    if backend == "cpu":
        from fastformer.ops.attention.cpu import dropout_keep_mask
        return dropout_keep_mask
    if backend == "triton":
        from fastformer.kernels.attention_common import dropout_keep_mask
        return dropout_keep_mask
    from fastformer.ops.attention.naive import dropout_keep_mask
    return dropout_keep_mask


@pytest.mark.parametrize("backend,dtype", [b for b in DENSE_BACKENDS if b[0] != "reference"],
                         ids=lambda x: str(x).split(".")[-1])
def test_dropout_with_variants_matches_explicit_keep_mask(backend, dtype):
    require_backend(backend)
    from fastformer.ops.attention.fused import draw_rng_state

    p = 0.3
    q, k, v = _qkv(L=21, S=27, dtype=dtype, grad=True)
    slopes = torch.rand(4)
    kw = dict(window=(6, 0), alibi_slopes=slopes, softcap=2.5)
    torch.manual_seed(99)
    out = fastformer.attention(q, k, v, enable_gqa=True, dropout_p=p, window_size=kw["window"],
                               alibi_slopes=slopes, softcap=2.5, backend=backend)
    torch.manual_seed(99)
    keep = _keep_mask_fn(backend)(draw_rng_state(p, q.device), (2, 4, 21, 27), p, q.device)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    same = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_attention(*up, keep=keep, dropout_p=p, **kw)
    ref_same, _ = reference_attention(*same, keep=keep, dropout_p=p, **kw)
    assert_close_by_rule(out, ref, ref_same, name=f"{backend}/dropout/out")
    dout = torch.randn_like(ref)
    for name, a, r, s in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout.to(dtype)),
                             torch.autograd.grad(ref, up, dout), torch.autograd.grad(ref_same, same, dout.to(dtype))):
        assert_close_by_rule(a, r, s, name=f"{backend}/dropout/{name}")


# ------------------------------------------------------------------------------------ varlen

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_varlen_with_variants(backend):
    if backend == "triton":
        require_backend("triton")
    lens_q, lens_k = [5, 17, 1], [9, 17, 4]
    Hq, Hkv, E = 4, 2, 16
    qs = [torch.randn(n, Hq, E, dtype=torch.float64) for n in lens_q]
    ks = [torch.randn(n, Hkv, E, dtype=torch.float64) for n in lens_k]
    vs = [torch.randn(n, Hkv, E, dtype=torch.float64) for n in lens_k]
    slopes = torch.rand(3, Hq)
    kw = dict(window=(3, -1), softcap=2.0)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)  # noqa: E731
    q, k, v = (torch.cat(t).float().requires_grad_(True) for t in (qs, ks, vs))
    out = fastformer.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=True,
                                      window_size=kw["window"], alibi_slopes=slopes, softcap=2.0, backend=backend)
    refs, sames = [], []
    for b in range(3):
        t4 = [x[b].transpose(0, 1)[None] for x in (qs, ks, vs)]
        refs.append(reference_attention(*t4, is_causal=True, bottom_right=True, alibi_slopes=slopes[b:b + 1],
                                        **kw)[0][0].transpose(0, 1))
        sames.append(reference_attention(*(t.float() for t in t4), is_causal=True, bottom_right=True,
                                         alibi_slopes=slopes[b:b + 1], **kw)[0][0].transpose(0, 1))
    ref, same = torch.cat(refs), torch.cat(sames)
    assert_close_by_rule(out, ref, same, name=f"varlen/{backend}/out")
    dout = torch.randn_like(ref)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    g = torch.autograd.grad(out, (q, k, v), dout.float())
    # gradients of the float64 reference through the same per-sequence split
    refs = []
    off_q, off_k = 0, 0
    for b in range(3):
        sl_q, sl_k = slice(off_q, off_q + lens_q[b]), slice(off_k, off_k + lens_k[b])
        t4 = [up[0][sl_q].transpose(0, 1)[None], up[1][sl_k].transpose(0, 1)[None], up[2][sl_k].transpose(0, 1)[None]]
        refs.append(reference_attention(*t4, is_causal=True, bottom_right=True, alibi_slopes=slopes[b:b + 1],
                                        **kw)[0][0].transpose(0, 1))
        off_q, off_k = off_q + lens_q[b], off_k + lens_k[b]
    g_ref = torch.autograd.grad(torch.cat(refs), up, dout)
    for name, a, r in zip(("dq", "dk", "dv"), g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-5, msg=f"varlen/{backend}/{name}")


# ------------------------------------------------------------------------------------ decode, paged KV

def _decode_reference(q, k, v, lens, window=(-1, -1), slopes=None, softcap=0.0):
    """Per sequence: the last Lq positions of its first lens[b] keys, bottom-right, float64."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        o, _ = reference_attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                   is_causal=True, bottom_right=True, window=window,
                                   alibi_slopes=None if slopes is None else slopes[b:b + 1], softcap=softcap)
        outs.append(o)
    return torch.cat(outs)


def _page(k, v, block_size, extra_blocks=3, seed=0):
    """The caches (B, Hkv, S, D) scattered into a shuffled pool of blocks + the table."""
    B, Hkv, S, D = k.shape
    nb = S // block_size
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B * nb + extra_blocks, generator=gen)[: B * nb]
    pool_k = torch.randn(B * nb + extra_blocks, block_size, Hkv, D, dtype=k.dtype)
    pool_v = torch.randn(B * nb + extra_blocks, block_size, Hkv, v.shape[-1], dtype=v.dtype)
    pool_k[perm] = k.view(B, Hkv, nb, block_size, D).permute(0, 2, 3, 1, 4).reshape(-1, block_size, Hkv, D)
    pool_v[perm] = v.view(B, Hkv, nb, block_size, -1).permute(0, 2, 3, 1, 4).reshape(-1, block_size, Hkv,
                                                                                         v.shape[-1])
    return pool_k, pool_v, perm.view(B, nb).to(torch.int32)


DECODE_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "window", "alibi_softcap", "all"])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_variants_and_paged(backend, Lq, variant, paged):
    if backend == "triton":
        require_backend("triton")
    B, Hq, Hkv, S, D, bs = 3, 4, 2, 64, 16, 16
    k = torch.randn(B, Hkv, S, D)
    v = torch.randn(B, Hkv, S, D)
    q = torch.randn(B, Hq, Lq, D)
    lens = torch.tensor([37, 64, 5], dtype=torch.int32)
    kw = {"plain": {}, "window": dict(window_size=(6, 0)),
          "alibi_softcap": dict(alibi_slopes=torch.rand(B, Hq), softcap=2.0),
          "all": dict(window_size=(9, -1), alibi_slopes=torch.rand(Hq), softcap=1.5)}[variant]
    ref_slopes = kw.get("alibi_slopes")
    if ref_slopes is not None and ref_slopes.dim() == 1:
        ref_slopes = ref_slopes[None].expand(B, Hq)
    ref = _decode_reference(q, k, v, lens, kw.get("window_size", (-1, -1)), ref_slopes, kw.get("softcap", 0.0))
    if paged:
        pk, pv, table = _page(k, v, bs)
        out = fastformer.decode_attention(q, pk, pv, lens, block_table=table, backend=backend, **kw)
    else:
        out = fastformer.decode_attention(q, k, v, lens, backend=backend, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_paged_ignores_table_entries_past_the_length():
    B, Hq, Hkv, S, D, bs = 2, 2, 1, 32, 8, 8
    k, v, q = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hq, 1, D)
    lens = torch.tensor([9, 16], dtype=torch.int32)
    pk, pv, table = _page(k, v, bs)
    table[0, 2:] = -1  # unused by sequence 0 (9 entries = 2 blocks): padding as vLLM writes it
    table[1, 2:] = 10_000
    for backend in ("torch", "triton") if fastformer.backends()["triton"]["available"] else ("torch",):
        out = fastformer.decode_attention(q, pk, pv, lens, block_table=table, backend=backend)
        torch.testing.assert_close(out.double(), _decode_reference(q, k, v, lens), rtol=0, atol=2e-5)


@pytest.mark.parametrize("change, error, match", [
    (lambda t, n: (t.to(torch.int64), n), TypeError, "int32"),
    (lambda t, n: (t[:1], n), ValueError, "block_table must have shape"),
    (lambda t, n: (t.clone().fill_(-1), n), ValueError, r"block_table\[0, 0\] = -1"),
    (lambda t, n: (t + 1000, n), ValueError, "is not a block of the cache"),
    (lambda t, n: (t, torch.tensor([5, 33], dtype=torch.int32)), ValueError, r"cache_seqlens\[1\] = 33"),
    (lambda t, n: (t, torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"cache_seqlens\[0\] = -1"),
    (lambda t, n: (t, 40), ValueError, "cache_seqlens"),
])
def test_paged_validation_names_the_problem(change, error, match):
    B, Hq, Hkv, S, D, bs = 2, 2, 1, 32, 8, 8
    k, v, q = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hq, 1, D)
    pk, pv, table = _page(k, v, bs, extra_blocks=0)
    table, lens = change(table, torch.tensor([9, 16], dtype=torch.int32))
    for backend in ("torch", "triton") if fastformer.backends()["triton"]["available"] else ("torch",):
        with pytest.raises(error, match=match):
            fastformer.decode_attention(q, pk, pv, lens, block_table=table, backend=backend)


def test_paged_cache_shape_is_checked():
    q = torch.randn(2, 4, 1, 8)
    table = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim"):
        fastformer.decode_attention(q, torch.randn(8, 4, 2, 16), torch.randn(8, 4, 2, 16), 3, block_table=table)
    with pytest.raises(ValueError, match="must agree"):
        fastformer.decode_attention(q, torch.randn(8, 4, 2, 8), torch.randn(8, 2, 2, 8), 3, block_table=table)
    with pytest.raises(ValueError, match="multiple"):
        fastformer.decode_attention(q, torch.randn(8, 4, 3, 8), torch.randn(8, 4, 3, 8), 3, block_table=table)


def test_varlen_and_decode_check_the_variant_arguments():
    q = torch.randn(7, 4, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="alibi_slopes"):  # (B, Hq) with B = 2 sequences
        fastformer.varlen_attention(q, q, q, cu, cu, 4, 4, alibi_slopes=torch.rand(3, 4))
    with pytest.raises(ValueError, match="window_size"):
        fastformer.varlen_attention(q, q, q, cu, cu, 4, 4, window_size=(-3, 0))
    with pytest.raises(ValueError, match="softcap"):
        fastformer.varlen_attention(q, q, q, cu, cu, 4, 4, softcap=-2.0)
    qd, cache = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 16, 8)
    with pytest.raises(TypeError, match="alibi_slopes"):
        fastformer.decode_attention(qd, cache, cache, 5, alibi_slopes=torch.rand(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastformer.decode_attention(qd, cache, cache, 5, alibi_slopes=torch.rand(2, 2))
    with pytest.raises(TypeError, match="window_size"):
        fastformer.decode_attention(qd, cache, cache, 5, window_size=(2.0, 0))
    with pytest.raises(TypeError, match="block_table"):
        fastformer.decode_attention(qd, cache, cache, 5, block_table=[[0, 1]])
