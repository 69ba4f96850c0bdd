"""The "cuda" attention backend (csrc/cuda flash kernels) at realistic shapes, on a GPU.

The shared feature matrix runs through tests/test_attention_backends.py (GPU_COMBOS);
these add long sequences, both head dims, awkward lengths around the 64-wide
tiles, GQA, masks read through strides, the log-sum-exp, determinism of the
backward, strided inputs and the fallback reasons. All @pytest.mark.cuda.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastformer
from attention_cases import require_backend
from error_rule import assert_close_by_rule

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]


def _sdpa(q, k, v, mask=None, is_causal=False, bottom_right=False, scale=None):
    if is_causal and bottom_right:
        L, S = q.shape[-2], k.shape[-2]
        mask, is_causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _check(B, Hq, Hkv, L, S, E, dtype, Ev=None, mask=None, is_causal=False, bottom_right=False, grads=True,
           layout="bhle"):
    require_backend("cuda")
    Ev = Ev or E
    dev = "cuda"
    q64 = torch.randn(B, Hq, L, E, dtype=torch.float64, device=dev)
    k64 = torch.randn(B, Hkv, S, E, dtype=torch.float64, device=dev)
    v64 = torch.randn(B, Hkv, S, Ev, dtype=torch.float64, device=dev)
    if layout == "blhe":  # (B, L, H, E) storage viewed as (B, H, L, E): strided heads, as from a fused QKV
        q, k, v = (t.transpose(1, 2).contiguous().to(dtype).transpose(1, 2) for t in (q64, k64, v64))
    else:
        q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    mask_same = mask if (mask is None or mask.dtype == torch.bool) else mask.to(dtype)
    ours = fastformer.attention(q, k, v, attn_mask=mask_same, is_causal=is_causal, causal_bottom_right=bottom_right,
                                enable_gqa=Hq != Hkv, backend="cuda")
    ref_in = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    mask64 = mask if (mask is None or mask.dtype == torch.bool) else mask_same.double()
    ref = _sdpa(*ref_in, mask64, is_causal, bottom_right)
    same_in = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    same = _sdpa(*same_in, mask_same, is_causal, bottom_right)
    assert_close_by_rule(ours, ref, same, name="out")
    if not grads:
        return
    dout = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, (q, k, v), dout.to(dtype))
    g_ref = torch.autograd.grad(ref, ref_in, dout)
    g_same = torch.autograd.grad(same, same_in, dout.to(dtype))
    for name, a, r, s in zip(("dq", "dk", "dv"), g_ours, g_ref, g_same):
        assert_close_by_rule(a, r, s, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_long_sequences(dtype, E, is_causal):
    _check(2, 8, 8, 1024, 1024, E, dtype, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 300), (63, 65), (65, 63), (127, 129), (1000, 77), (77, 1000)])
def test_awkward_lengths(dtype, L, S):
    _check(1, 2, 2, L, S, 64, dtype)
    _check(1, 2, 2, L, S, 128, dtype, is_causal=True, bottom_right=True)


@pytest.mark.parametrize("L,S", [(200, 130), (130, 200), (64, 64), (65, 1)])
def test_causal_top_left_and_bottom_right(L, S):
    _check(2, 3, 3, L, S, 64, torch.bfloat16, is_causal=True)
    _check(2, 3, 3, L, S, 64, torch.bfloat16, is_causal=True, bottom_right=True)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (6, 3)])
def test_gqa(Hq, Hkv):
    _check(2, Hq, Hkv, 257, 300, 128, torch.bfloat16, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", ["B11S", "LS", "BHLS"])
def test_masks_through_strides(kind, shape):
    B, H, L, S = 2, 4, 190, 333
    full = {"B11S": (B, 1, 1, S), "LS": (L, S), "BHLS": (B, H, L, S)}[shape]
    keep = torch.rand(full, device="cuda") > 0.3
    keep[..., 0] = True
    mask = keep if kind == "bool" else torch.randn(full, device="cuda", dtype=torch.float64).masked_fill(~keep, -math.inf)
    _check(B, H, H, L, S, 64, torch.float16, mask=mask)


def test_padded_head_dims_and_ev():
    _check(2, 4, 4, 150, 170, 80, torch.bfloat16)           # E=80 runs padded to 128
    _check(2, 4, 4, 150, 170, 32, torch.float16, Ev=96)      # E != Ev, both padded to 128
    _check(1, 2, 2, 70, 70, 16, torch.bfloat16, is_causal=True)


def test_strided_heads_layout():
    _check(2, 8, 8, 300, 300, 64, torch.bfloat16, layout="blhe", is_causal=True)


def test_dead_rows_output_zero_and_lse_minus_inf():
    require_backend("cuda")
    q, k, v = (torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(70, 70, dtype=torch.bool, device="cuda")
    mask[5] = False
    out, lse = fastformer.attention(q, k, v, attn_mask=mask, return_lse=True, backend="cuda")
    assert torch.all(out[:, :, 5] == 0) and torch.all(torch.isneginf(lse[:, :, 5]))
    ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) / 8.0 + torch.where(mask, 0.0, -math.inf), -1)
    ok = ~torch.isneginf(ref)
    assert torch.allclose(lse[ok].double(), ref[ok], atol=2e-2)


def test_backward_is_deterministic():
    require_backend("cuda")
    q, k, v = (torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)

    def grads():
        out = fastformer.attention(q, k, v, is_causal=True, backend="cuda")
        return torch.autograd.grad(out, (q, k, v), dout)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_unsupported_inputs_raise_for_forced_backend_and_auto_falls_back():
    require_backend("cuda")
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fastformer.attention(q, q, q, backend="cuda")
    big = torch.randn(1, 2, 16, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dims"):
        fastformer.attention(big, big, big, backend="cuda")
    with pytest.raises(ValueError, match="dropout"):
        fastformer.attention(big[..., :64], big[..., :64], big[..., :64], dropout_p=0.1, backend="cuda")
    fastformer.attention(big, big, big)  # auto: another backend takes it


def test_runs_on_a_side_stream_and_under_compile():
    require_backend("cuda")
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = fastformer.attention(q, k, v, is_causal=True, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fastformer.attention(q, k, v, is_causal=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)
    compiled = torch.compile(lambda a, b, c: fastformer.attention(a, b, c, is_causal=True, backend="cuda"),
                             fullgraph=True)
    assert torch.equal(compiled(q, k, v), expected)


def test_opcheck_of_the_fused_ops_with_cuda_kernels():
    require_backend("cuda")
    from fastformer.ops.attention import fused  # noqa: F401  (registers the ops)

    q, k, v = (torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    args = (q, k, v, None, None, 0.0, True, False, 0.125, "cuda")
    torch.library.opcheck(torch.ops.fastformer.attention_fwd.default, args)
