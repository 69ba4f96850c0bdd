"""Edge cases give torch's answer on every attention backend that runs here."""

import pytest
import torch
import torch.nn.functional as F

import fastformer
from attention_cases import require_backend
from error_rule import assert_close_by_rule

# Backends and dtypes that run on CPU tensors here (Triton through the interpreter).
BACKENDS = [("reference", torch.float32), ("naive", torch.float32), ("cpu", torch.float32), ("triton", torch.float32)]


def _check(backend, dtype, q, k, v, **kw):
    """Output and gradients of ``backend`` vs torch (float64 reference + same-dtype torch)."""
    require_backend(backend)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fastformer.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw64 = dict(kw)
    if isinstance(kw.get("attn_mask"), torch.Tensor) and kw["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw["attn_mask"].double()
    ref = F.scaled_dot_product_attention(*up, **kw64)
    same_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    same = F.scaled_dot_product_attention(*same_in, **kw)
    assert out.shape == ref.shape
    assert_close_by_rule(out, ref, same, name=f"{backend}/out")
    if out.numel() == 0:
        return
    dout = torch.randn_like(ref)
    for name, a, r, s in zip(
        ("dq", "dk", "dv"),
        torch.autograd.grad(out, (q, k, v), dout.to(dtype)),
        torch.autograd.grad(ref, up, dout),
        torch.autograd.grad(same, same_in, dout.to(dtype)),
    ):
        assert torch.isfinite(a).all(), f"{backend}/{name}: non-finite gradient"
        assert_close_by_rule(a, r, s, name=f"{backend}/{name}")


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("shapes", [((0, 2, 5, 8), (0, 2, 7, 8)), ((1, 2, 0, 8), (1, 2, 7, 8)),
                                    ((1, 2, 5, 8), (1, 2, 0, 8))], ids=["batch0", "L0", "S0"])
def test_empty(backend, dtype, shapes):
    require_backend(backend)
    q, k = rand(*shapes[0], dtype=dtype), rand(*shapes[1], dtype=dtype)
    out = fastformer.scaled_dot_product_attention(q, k, k.clone(), backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k.clone()))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("E", [1, 2, 3, 4, 8])
def test_tiny_head_dims(backend, dtype, E):
    _check(backend, dtype, rand(1, 1, 6, E, dtype=dtype), rand(1, 1, 9, E, dtype=dtype), rand(1, 1, 9, E, dtype=dtype))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_single_token_single_head(backend, dtype):
    _check(backend, dtype, rand(1, 1, 1, 8), rand(1, 1, 1, 8), rand(1, 1, 1, 8), is_causal=True)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_non_contiguous(backend, dtype, layout):
    if layout == "transposed":  # (B, L, H, E) memory seen as (B, H, L, E)
        q, k, v = (rand(2, n, 3, 16, dtype=dtype).transpose(1, 2) for n in (11, 13, 13))
    elif layout == "sliced":
        q, k, v = (rand(2, 3, n, 40, dtype=dtype)[..., ::2][:, :, 1:] for n in (12, 14, 14))
    else:  # one batch row broadcast with stride 0
        q = rand(2, 3, 9, 16, dtype=dtype)
        k, v = (rand(1, 3, 10, 16, dtype=dtype).expand(2, 3, 10, 16) for _ in range(2))
    assert not q.is_contiguous() or not k.is_contiguous()
    _check(backend, dtype, q, k, v)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_large_logits_do_not_overflow(backend, dtype):
    # scores x scale reach ~1e4: an unshifted exp would overflow.
    q, k, v = rand(1, 2, 16, 8) * 60, rand(1, 2, 16, 8) * 60, rand(1, 2, 16, 8)
    _check(backend, dtype, q, k, v, is_causal=True)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_every_key_masked(backend, dtype):
    mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = True  # batch 1 has no visible key at all
    _check(backend, dtype, rand(2, 2, 5, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8), attn_mask=mask)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_neg_inf_float_mask(backend, dtype):
    mask = torch.randn(5, 9, dtype=torch.float64).to(dtype)
    mask[:, 3:] = float("-inf")
    _check(backend, dtype, rand(1, 2, 5, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8), attn_mask=mask)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_nan_query_does_not_leak(backend, dtype):
    """A NaN in one query row stays in that row (torch's math path gives NaN there,
    its CPU flash kernel 0: either is accepted); every other row equals torch's."""
    require_backend(backend)
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    q[0, 0, 2, 3] = float("nan")
    out = fastformer.scaled_dot_product_attention(q, k, v, backend=backend)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    clean = torch.ones(out.shape[:-1], dtype=torch.bool)
    clean[0, 0, 2] = False
    assert not torch.isnan(out[clean]).any(), "NaN leaked into rows without NaN inputs"
    torch.testing.assert_close(out[clean].double(), ref[clean], rtol=1e-5, atol=1e-5)
    bad_row = out[0, 0, 2]
    assert torch.isnan(bad_row).all() or torch.equal(bad_row, torch.zeros_like(bad_row))
