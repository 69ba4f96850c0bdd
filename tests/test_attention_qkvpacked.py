"""fastformer.attention_qkvpacked (FlashAttention's ``flash_attn_qkvpacked_func``): qkv (B, L, 3, H, E)
→ (B, L, H, E). On the cpu backend the kernels write the output in that layout and the packed
gradient of qkv in place (strided outputs of the C++ entry points); elsewhere it is the split form.

Correctness follows the project's rule (float64 reference on float64 copies; the error at most 2×
torch's same-dtype error); outputs are NaN-poisoned by conftest, so an element the kernels never
write fails. The packed form runs the same arithmetic as the split one: bit-identical results.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastformer
from attention_cases import require_backend
from error_rule import assert_close_by_rule

fused = importlib.import_module("fastformer.ops.attention.fused")
_ids = lambda t: str(t).split(".")[-1]  # noqa: E731


def _split(qkv):
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


def _torch(qkv, causal, scale=None, **variant):
    q, k, v = _split(qkv)
    if variant:
        return fastformer.attention(q, k, v, is_causal=causal, scale=scale, backend="reference", **variant).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(1, 2)


def _check(qkv, causal, backend, scale=None, **variant):
    """Output and qkv gradient of the packed op against float64 and torch's same dtype."""
    qkv = qkv.detach().requires_grad_()
    out = fastformer.attention_qkvpacked(qkv, softmax_scale=scale, causal=causal, backend=backend, **variant)
    assert out.shape == qkv.shape[:2] + qkv.shape[3:] and out.is_contiguous() and out.dtype == qkv.dtype
    g = torch.randn(out.shape, device=qkv.device).to(qkv.dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    q64 = qkv.detach().double().requires_grad_()
    ref = _torch(q64, causal, scale, **variant)
    (d64,) = torch.autograd.grad(ref, q64, g.double())
    qs = qkv.detach().clone().requires_grad_()
    same = _torch(qs, causal, scale, **variant)
    (ds,) = torch.autograd.grad(same, qs, g)
    assert_close_by_rule(out, ref, same, "out")
    assert_close_by_rule(dqkv, d64.to(qkv.dtype) if qkv.dtype != torch.float32 else d64, ds, "dqkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,L,H,E", [(2, 70, 3, 32), (1, 1, 2, 64), (1, 131, 2, 80), (2, 33, 1, 128)])
def test_cpu_backend_follows_the_error_rule(dtype, causal, B, L, H, E):
    """Head dims that are and are not a multiple of the panel width (80: padded dQ accumulator, then
    copied into the packed gradient), one row, several query blocks."""
    require_backend("cpu")
    torch.manual_seed(L * 7 + E)
    _check(torch.randn(B, L, 3, H, E).to(dtype), causal, "cpu")


@pytest.mark.parametrize("variant", [dict(window_size=(5, 0)), dict(softcap=3.0),
                                     dict(alibi_slopes=torch.tensor([0.5, 0.125]))], ids=["window", "softcap", "alibi"])
def test_variants(variant):
    require_backend("cpu")
    torch.manual_seed(3)
    _check(torch.randn(2, 40, 3, 2, 16), True, "cpu", scale=0.3, **variant)


def test_reference_backend_and_auto():
    torch.manual_seed(4)
    _check(torch.randn(2, 20, 3, 2, 8), True, "reference")
    _check(torch.randn(2, 20, 3, 2, 8), False, "auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_packed_equals_split_bit_for_bit(dtype):
    """The packed op and fastformer.attention on the same views run the same kernels: output and
    gradients (the split form's, concatenated by autograd) are identical, in training and without
    grad, and the packed backward writes one (B, L, 3, H, E) gradient."""
    require_backend("cpu")
    torch.manual_seed(5)
    qkv = torch.randn(2, 77, 3, 4, 64).to(dtype).requires_grad_()
    g = torch.randn(2, 77, 4, 64).to(dtype)
    out = fastformer.attention_qkvpacked(qkv, causal=True, backend="cpu")
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    q, k, v = _split(qkv)
    out_s = fastformer.attention(q, k, v, is_causal=True, backend="cpu").transpose(1, 2)
    (dqkv_s,) = torch.autograd.grad(out_s, qkv, g)
    assert torch.equal(out, out_s) and torch.equal(dqkv, dqkv_s)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    with torch.no_grad():
        assert torch.equal(fastformer.attention_qkvpacked(qkv, causal=True, backend="cpu"), out)


def test_dropout_is_reproducible_and_matches_split():
    """Dropout draws its seed from torch's generator: the same seed gives the same output and
    gradient, and the split form with that seed gives the same ones."""
    require_backend("cpu")
    qkv = torch.randn(1, 50, 3, 2, 16).requires_grad_()
    runs = []
    for packed in (True, True, False):
        torch.manual_seed(6)
        if packed:
            out = fastformer.attention_qkvpacked(qkv, dropout_p=0.3, backend="cpu")
        else:
            q, k, v = _split(qkv)
            out = fastformer.attention(q, k, v, dropout_p=0.3, backend="cpu").transpose(1, 2)
        runs.append((out, torch.autograd.grad(out.sum(), qkv)[0]))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])
    assert not torch.equal(runs[0][0], fastformer.attention_qkvpacked(qkv.detach(), backend="cpu"))


def test_strided_qkv_autocast_and_empty():
    require_backend("cpu")
    torch.manual_seed(7)
    big = torch.randn(2, 30, 3, 3, 40)
    _check(big[:, ::2, :, :, 4:36], False, "cpu")  # every stride but the last non-trivial
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastformer.attention_qkvpacked(torch.randn(1, 16, 3, 2, 32), causal=True)
    assert out.dtype == torch.bfloat16
    for shape in [(0, 5, 3, 2, 8), (2, 0, 3, 2, 8)]:
        qkv = torch.randn(shape, requires_grad=True)
        out = fastformer.attention_qkvpacked(qkv, backend="cpu")
        assert out.shape == shape[:2] + shape[3:]
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


def test_traced_and_transformed_calls_take_the_split_form():
    """torch.compile-free checks of the paths that must not call the kernels directly: a functorch
    transform (vmap) and a tensor subclass get the split form's custom op or torch, with the same values."""
    require_backend("cpu")
    torch.manual_seed(8)
    qkv = torch.randn(3, 2, 12, 3, 2, 8)
    out = torch.vmap(lambda t: fastformer.attention_qkvpacked(t, causal=True))(qkv)
    expect = torch.stack([_torch(t, True) for t in qkv])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


def test_bad_input_names_qkv():
    with pytest.raises(TypeError, match="qkv must be a Tensor"):
        fastformer.attention_qkvpacked([1, 2, 3])
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        fastformer.attention_qkvpacked(torch.randn(2, 5, 3, 8))
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        fastformer.attention_qkvpacked(torch.randn(2, 5, 2, 2, 8))
    with pytest.raises(ValueError, match="window_size"):
        fastformer.attention_qkvpacked(torch.randn(2, 5, 3, 2, 8), window_size=(-2, 0))
    with pytest.raises((TypeError, ValueError), match="window_size"):
        fastformer.attention_qkvpacked(torch.randn(2, 5, 3, 2, 8), window_size=5)
    qkv = torch.randn(2, 5, 3, 2, 8)
    assert torch.equal(fastformer.attention_qkvpacked(qkv, window_size=None), fastformer.attention_qkvpacked(qkv))


def test_raw_entry_points_take_row_strided_outputs_and_refuse_overlap():
    """The C++ forward/backward write out, dq, dk, dv through their strides (unit last stride), and
    refuse outputs whose elements overlap (an expanded tensor) with a message naming them."""
    require_backend("cpu")
    C = fastformer._ext.C
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    sc = 0.25
    out_c, lse_c = torch.empty(2, 3, 20, 16), torch.empty(2, 3, 20)
    C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, True, False, sc, out_c, lse_c)
    out_t, lse_t = torch.full((2, 20, 3, 16), float("nan")).transpose(1, 2), torch.empty(2, 3, 20)
    C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, True, False, sc, out_t, lse_t)
    assert torch.equal(out_c, out_t) and torch.equal(lse_c, lse_t)
    do = torch.randn(2, 3, 20, 16)
    grads_c = [torch.empty(2, 3, 20, 16) for _ in range(3)]
    C.attention_cpu_backward(do, q, k, v, out_c, lse_c, None, 0.0, 0, 0, True, False, sc, *grads_c)
    packed = torch.full((2, 20, 3, 3, 16), float("nan"))
    grads_p = [packed.select(2, i).transpose(1, 2) for i in range(3)]
    C.attention_cpu_backward(do, q, k, v, out_c, lse_c, None, 0.0, 0, 0, True, False, sc, *grads_p)
    for a, b in zip(grads_c, grads_p):
        assert torch.equal(a, b)
    assert not packed.isnan().any()
    with pytest.raises(RuntimeError, match="out must be .* no overlapping elements"):
        C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, True, False, sc, torch.empty(1, 3, 20, 16).expand(2, 3, 20, 16),
                                torch.empty(2, 3, 20))
    # Outputs overlapping each other (a wrong slice index, one tensor twice, an lse inside out).
    for dq, dk, dv in ((grads_p[0], grads_p[1], grads_p[1]), (grads_c[0], grads_c[0], grads_c[2]),
                       (grads_p[0], packed[:, :, 1:].flatten(2, 3)[:, :, 1:4].transpose(1, 2), grads_p[2])):
        with pytest.raises(RuntimeError, match="dq, dk and dv must not share elements with each other"):
            C.attention_cpu_backward(do, q, k, v, out_c, lse_c, None, 0.0, 0, 0, True, False, sc, dq, dk, dv)
    buf = torch.empty(2 * 3 * 20 * 16)
    with pytest.raises(RuntimeError, match="out and lse must not share elements"):
        C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, True, False, sc, buf.view(2, 3, 20, 16), buf[:120].view(2, 3, 20))
    big = torch.empty(120 + 1920)  # lse and dv in one storage: dv would be written while lse is read
    big[:120].copy_(lse_c.flatten())
    with pytest.raises(RuntimeError, match="must not share memory with .*lse"):
        C.attention_cpu_backward(do, q, k, v, out_c, big[:120].view(2, 3, 20), None, 0.0, 0, 0, True, False, sc,
                                 grads_c[0], grads_c[1], big[120:].view(2, 3, 20, 16))
    with pytest.raises(RuntimeError, match="dk must be .* unit stride"):
        C.attention_cpu_backward(do, q, k, v, out_c, lse_c, None, 0.0, 0, 0, True, False, sc, grads_c[0],
                                 torch.empty(2, 3, 16, 20).transpose(2, 3), grads_c[2])


def test_attention_module_runs_the_packed_op_and_matches_the_split_path():
    """fastformer.nn.Attention (self-attention, no cache/rotary/q-k norm, as many KV heads as query
    heads) calls attention_qkvpacked; output and every parameter gradient equal the split path's,
    which it still takes for GQA."""
    from fastformer.nn import Attention

    require_backend("cpu")
    torch.manual_seed(10)
    attn = Attention(64, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 50, 64, requires_grad=True)
    calls = []
    real = fused.run_qkvpacked
    fused_mod = importlib.import_module("fastformer.ops.attention.qkvpacked")
    fused_mod.run_qkvpacked = lambda *a: calls.append(1) or real(*a)
    try:
        y = attn(x, is_causal=True)
    finally:
        fused_mod.run_qkvpacked = real
    assert calls == [1]
    y.square().sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    x.grad = None
    attn.zero_grad()
    attn.k_norm = torch.nn.Sequential()  # an identity the packed condition does not take: the split path
    y2 = attn(x, is_causal=True)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, [x.grad] + [p.grad for p in attn.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gqa = Attention(64, num_heads=4, num_kv_heads=2)
    fused_mod.run_qkvpacked = lambda *a: calls.append(1) or real(*a)
    try:
        gqa(torch.randn(2, 10, 64))
    finally:
        fused_mod.run_qkvpacked = real
    assert calls == [1]


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_packed_follows_the_error_rule(causal):
    """On CUDA the packed op runs the split form on auto's backend: bf16 output and qkv gradient
    within the error rule, the output equal to fastformer.attention's on the same views."""
    torch.manual_seed(11)
    qkv = torch.randn(2, 300, 3, 4, 64, device="cuda").to(torch.bfloat16)
    _check(qkv, causal, "auto")
    out = fastformer.attention_qkvpacked(qkv, causal=causal)
    q, k, v = _split(qkv)
    torch.testing.assert_close(out, fastformer.attention(q, k, v, is_causal=causal).transpose(1, 2), rtol=0, atol=0)
