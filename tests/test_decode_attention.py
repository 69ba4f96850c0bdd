"""fastformer.decode_attention: the split-K Triton kernels (interpreter on CPU) and the
PyTorch fallback, against a float64 reference under the error rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from error_rule import assert_close_by_rule
from fastformer.ops.decode_attention import decode_attention


def reference(q, k_cache, v_cache, lens, scale, causal):
    """Attention over each sequence's valid cache prefix, bottom-right causal, GQA by
    repeating KV heads; rows that see nothing are 0. Works in q's dtype."""
    B, Hq, Lq, D = q.shape
    G = Hq // k_cache.shape[1]
    outs = []
    for b in range(B):
        S = int(lens[b])
        k = k_cache[b, :, :S].repeat_interleave(G, 0)
        v = v_cache[b, :, :S].repeat_interleave(G, 0)
        s = (q[b] @ k.transpose(-1, -2)) * scale
        if causal:
            vis = torch.arange(S, device=q.device)[None, :] <= (S - Lq + torch.arange(Lq, device=q.device))[:, None]
            s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0) if S else s.new_zeros(Hq, Lq, 0)
        outs.append(p @ v if S else q.new_zeros(Hq, Lq, v_cache.shape[-1]))
    return torch.stack(outs)


CASES = [
    # B, Hq, Hkv, Lq, Smax, D, Dv, lens, splits, causal
    dict(B=2, Hq=4, Hkv=4, Lq=1, Smax=100, D=32, Dv=32, lens=[100, 37], splits=3, causal=True),
    dict(B=2, Hq=8, Hkv=2, Lq=1, Smax=90, D=16, Dv=16, lens=[65, 90], splits=4, causal=True),  # GQA
    dict(B=1, Hq=4, Hkv=1, Lq=3, Smax=70, D=24, Dv=8, lens=[70], splits=2, causal=True),  # MQA, Lq>1, Dv!=D
    dict(B=3, Hq=2, Hkv=2, Lq=4, Smax=50, D=16, Dv=16, lens=[4, 17, 50], splits=5, causal=True),
    dict(B=2, Hq=2, Hkv=1, Lq=2, Smax=40, D=16, Dv=16, lens=[31, 7], splits=1, causal=False),
    dict(B=2, Hq=2, Hkv=2, Lq=1, Smax=33, D=40, Dv=40, lens=[1, 33], splits=8, causal=True),  # empty splits
]


def _inputs(c, dtype):
    q = torch.randn(c["B"], c["Hq"], c["Lq"], c["D"], dtype=dtype)
    # Write the cache through a transpose so the kernel reads non-contiguous strides.
    k = torch.randn(c["B"], c["Smax"], c["Hkv"], c["D"], dtype=dtype).transpose(1, 2)
    v = torch.randn(c["B"], c["Hkv"], c["Smax"], c["Dv"], dtype=dtype)
    return q, k, v, torch.tensor(c["lens"], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_kernel_matches_reference(c, dtype):
    q, k, v, lens = _inputs(c, dtype)
    scale = 1 / math.sqrt(c["D"])
    out = decode_attention(q, k, v, lens, causal=c["causal"], num_splits=c["splits"], backend="triton")
    ref64 = reference(q.double(), k.double(), v.double(), lens, scale, c["causal"])
    same = reference(q, k, v, lens, scale, c["causal"])  # PyTorch's math in the same dtype
    assert out.dtype == dtype
    assert_close_by_rule(out, ref64, same)


@pytest.mark.parametrize("c", CASES[:5], ids=[f"case{i}" for i in range(5)])
def test_torch_fallback_matches_reference(c):
    q, k, v, lens = _inputs(c, torch.float32)
    scale = 1 / math.sqrt(c["D"])
    out = decode_attention(q, k, v, lens, causal=c["causal"], backend="torch")
    ref64 = reference(q.double(), k.double(), v.double(), lens, scale, c["causal"])
    assert_close_by_rule(out, ref64, reference(q, k, v, lens, scale, c["causal"]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uniform_int_length_and_default_splits(backend):
    q = torch.randn(2, 4, 2, 16)
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    out = decode_attention(q, k, v, 40, scale=0.3, backend=backend)
    lens = torch.tensor([40, 40])
    ref64 = reference(q.double(), k.double(), v.double(), lens, 0.3, True)
    assert_close_by_rule(out, ref64, reference(q, k, v, lens, 0.3, True))


def test_matches_full_attention_bottom_right():
    """The new tokens' rows of causal attention over the whole sequence."""
    q_all, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    full = F.scaled_dot_product_attention(q_all, k, v, is_causal=True)
    out = decode_attention(q_all[:, :, -3:], k, v, torch.tensor([20], dtype=torch.int32), num_splits=2,
                           backend="triton")
    torch.testing.assert_close(out, full[:, :, -3:], atol=1e-5, rtol=1e-5)


def test_rows_without_keys_are_zero():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    for backend in ("torch", "triton"):
        out = decode_attention(q, k, v, torch.tensor([1]), backend=backend, num_splits=2 if backend == "triton" else None)
        assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2])), backend
        assert torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 1, 16), k, v, 8)
    with pytest.raises(TypeError, match="cache_seqlens"):
        decode_attention(q, k, v, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="cache_seqlens"):
        decode_attention(q, k, v, 9)
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(q.half(), k, v, 8)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, k, v, 8, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernel(dtype):
    torch.manual_seed(0)
    q = torch.randn(4, 32, 1, 128, device="cuda", dtype=dtype)
    k = torch.randn(4, 8, 4096, 128, device="cuda", dtype=dtype)
    v = torch.randn(4, 8, 4096, 128, device="cuda", dtype=dtype)
    lens = torch.tensor([4096, 1000, 1, 3333], dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, lens)
    lens_cpu = lens.cpu()
    ref64 = reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), lens_cpu, 128 ** -0.5, True)
    same = reference(q, k, v, lens_cpu, 128 ** -0.5, True)  # PyTorch on the GPU in the same dtype
    assert_close_by_rule(out.cpu(), ref64, same.cpu())


# ---------------------------------------------------------------- issue 16: cache_seqlens is not trusted

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lens", [[7, 21, 1], [7, 20, 200], [-1, 5, 1]], ids=["past_end", "far_past_end", "negative"])
def test_out_of_range_lengths_raise(backend, lens):
    """Lengths outside [0, Smax] raise a ValueError naming cache_seqlens (no out-of-bounds read,
    no silent zero row, no unclear size mismatch); int32 and int64 alike."""
    q = torch.randn(3, 4, 2, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    for dtype in (torch.int32, torch.int64):
        with pytest.raises(ValueError, match="cache_seqlens"):
            decode_attention(q, k, v, torch.tensor(lens, dtype=dtype), backend=backend)
    with pytest.raises(ValueError, match="cache_seqlens"):
        decode_attention(q, k, v, 21, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_length_dtype_and_shape_raise(backend):
    q = torch.randn(3, 4, 2, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    for bad in (torch.tensor([7.0, 3.0, 1.0]), torch.tensor([7, 3]), torch.tensor([[7, 3, 1]])):
        with pytest.raises(TypeError, match="cache_seqlens"):
            decode_attention(q, k, v, bad, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_entries_past_the_length_are_never_read(backend, causal):
    """NaN (a reused cache's garbage) past each sequence's length does not reach the output."""
    q = torch.randn(3, 4, 2, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    lens = torch.tensor([7, 20, 2], dtype=torch.int32)
    k_dirty, v_dirty = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k_dirty[b, :, n:] = float("nan")
        v_dirty[b, :, n:] = float("inf")
    out = decode_attention(q, k_dirty, v_dirty, lens, causal=causal, num_splits=3, backend=backend)
    scale = 1 / math.sqrt(16)
    ref64 = reference(q.double(), k.double(), v.double(), lens, scale, causal)
    assert torch.isfinite(out).all()
    assert_close_by_rule(out, ref64, reference(q, k, v, lens, scale, causal))


def test_kernel_clamps_lengths_it_is_not_told_are_bad():
    """Lengths already on the GPU are not checked on the host (that would sync every step):
    the kernel clamps them to [0, Smax], so it never reads outside the cache."""
    from fastformer.kernels.decode import decode_attention_fwd

    q = torch.randn(3, 4, 2, 16)
    k, v = torch.randn(3, 2, 20, 16), torch.randn(3, 2, 20, 16)
    lens = torch.tensor([7, 1000, -5], dtype=torch.int32)
    out = torch.full((3, 4, 2, 16), float("nan"))
    lse = torch.full((3, 4, 2), float("nan"))
    o_part, lse_part = torch.empty(3, 4, 2, 2, 16), torch.empty(3, 4, 2, 2)
    decode_attention_fwd(q, k, v, lens, 0.25, True, out, lse, o_part, lse_part, num_splits=2, block_n=16)
    clamped = torch.tensor([7, 20, 0])
    ref64 = reference(q.double(), k.double(), v.double(), clamped, 0.25, True)
    assert_close_by_rule(out, ref64, reference(q, k, v, clamped, 0.25, True))
