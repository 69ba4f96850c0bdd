"""The CUDA fused softmax (csrc/cuda/softmax.cu) through fastformer.softmax(..., backend="cuda"), on a GPU.

Covers rows cached in shared memory and rows long enough for the online path
(32k and 100k columns), vectorised and scalar rows, bool/float/broadcast masks,
causal masking, fully masked rows and the backward. All @pytest.mark.cuda.
"""

import pytest
import torch

from error_rule import assert_close_by_rule

pytestmark = pytest.mark.cuda


def _softmax_ref(x, scale, mask, is_causal):
    s = x * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if is_causal:
        L, N = x.shape[-2], x.shape[-1]
        s = s.masked_fill(~torch.ones(L, N, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1), nan=0.0)


def _run(shape, dtype, scale=1.0, mask=None, is_causal=False):
    import fastformer
    from fastformer.ops.softmax_cuda import cuda_extension_unavailable

    reason = cuda_extension_unavailable()
    if reason:
        pytest.skip(reason)
    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    xs = x.to(dtype).requires_grad_(True)
    ours = fastformer.softmax(xs, scale=scale, mask=mask, is_causal=is_causal, backend="cuda")
    x64 = xs.detach().double().requires_grad_(True)
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = _softmax_ref(x64, scale, mask64, is_causal)
    same_in = xs.detach().clone().requires_grad_(True)
    same = _softmax_ref(same_in, scale, mask, is_causal)
    assert_close_by_rule(ours, ref, same, name="y")
    dy = torch.randn_like(ref)
    (g,) = torch.autograd.grad(ours, xs, dy.to(dtype))
    (g64,) = torch.autograd.grad(ref, x64, dy)
    (gs,) = torch.autograd.grad(same, same_in, dy.to(dtype))
    assert_close_by_rule(g, g64, gs, name="dx")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("N", [1, 7, 768, 1000, 4096, 8192])
def test_rows(dtype, N):
    _run((64, N), dtype, scale=0.7)


@pytest.mark.parametrize("N", [32768, 100_003, 131072])
def test_long_rows_online_path(N):
    _run((4, N), torch.bfloat16)


def test_causal_and_masks():
    B, H, L, N = 2, 3, 100, 130
    _run((B, H, L, N), torch.float16, is_causal=True)
    keep = torch.rand(B, 1, 1, N, device="cuda") > 0.4
    keep[..., 0] = True
    _run((B, H, L, N), torch.bfloat16, mask=keep)
    fmask = torch.randn(L, N, device="cuda", dtype=torch.float32)
    _run((B, H, L, N), torch.float32, mask=fmask, scale=0.125)


def test_fully_masked_rows_are_zero():
    import fastformer

    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(8, 64, dtype=torch.bool, device="cuda")
    mask[3] = False
    y = fastformer.softmax(x, mask=mask, backend="cuda")
    assert torch.all(y[3] == 0) and torch.allclose(y[0].float().sum(), torch.tensor(1.0, device="cuda"), atol=1e-2)
