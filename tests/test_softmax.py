"""fastformer.softmax: Triton kernels (interpreter on CPU) and the torch path, by the correctness rule."""

import pytest
import torch

import fastformer
from fused_checks import check_by_rule

softmax_module = __import__("fastformer.ops.softmax", fromlist=["_softmax_fwd_op"])


def eager_softmax(x, dim=-1, scale=1.0, mask=None, is_causal=False):
    """The plain torch math in x's dtype (float mask cast to x's dtype)."""
    s = x * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(x.dtype)
    if is_causal:
        L, N = x.shape[-2:]
        s = s.masked_fill(~torch.ones(L, N, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    y = torch.softmax(s, dim)
    return torch.nan_to_num(y, nan=0.0)


SHAPES = [(6, 42), (3, 5, 123), (2, 2, 3, 431)]
VARIANTS = {
    "plain": {},
    "scaled_bool_mask": {"scale": 0.37, "mask": "bool"},
    "float_mask": {"mask": "float"},
    "causal": {"is_causal": True, "scale": 1.5},
}


def _mask(kind, shape):
    mshape = (1,) * (len(shape) - 2) + shape[-2:] if len(shape) > 2 else shape  # broadcast over batch dims
    if kind == "bool":
        return torch.rand(mshape) > 0.3
    return torch.randn(mshape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_triton_by_rule(shape, variant, dtype):
    _check_variant(shape, variant, dtype, max_block=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_softmax_two_pass_by_rule(variant, dtype):
    """Rows longer than the (forced small) block: the online two-pass kernels."""
    _check_variant((3, 5, 123), variant, dtype, max_block=32)


def _check_variant(shape, variant, dtype, max_block):
    kw = dict(VARIANTS[variant])
    if "mask" in kw:
        kw["mask"] = _mask(kw["mask"], shape)
    x = torch.randn(shape) * 3
    ours = lambda t: fastformer.softmax(t, backend="triton", _max_block=max_block, **kw)  # noqa: E731
    eager = lambda t: eager_softmax(t, **kw)  # noqa: E731
    check_by_rule(ours, eager, [x], dtype)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_softmax_torch_path_by_rule(backend):
    x = torch.randn(4, 9, 77) * 2
    mask = torch.rand(9, 77) > 0.2
    ours = lambda t: fastformer.softmax(t, scale=0.5, mask=mask, is_causal=True, backend=backend)  # noqa: E731
    check_by_rule(ours, lambda t: eager_softmax(t, scale=0.5, mask=mask, is_causal=True), [x], torch.float32)


def test_softmax_other_dim_and_noncontiguous():
    x = torch.randn(5, 33, 6).transpose(0, 2)  # (6, 33, 5), dim 1 strided
    check_by_rule(lambda t: fastformer.softmax(t, dim=1, backend="triton"), lambda t: torch.softmax(t, 1),
                  [x], torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("max_block", [0, 16])
def test_fully_masked_rows_are_zero(backend, max_block):
    x = torch.randn(2, 5, 40, requires_grad=True)
    mask = torch.rand(5, 40) > 0.5
    mask[1] = False
    mask[3] = False
    y = fastformer.softmax(x, mask=mask, backend=backend, _max_block=max_block)
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1])) and torch.equal(y[:, 3], torch.zeros_like(y[:, 3]))
    assert torch.allclose(y[:, 0].sum(-1), torch.ones(2))
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and x.grad[:, 1].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("max_block", [0, 16])
def test_nan_and_inf_rows_are_torchs(backend, max_block):
    """A row with NaN or +inf, or of -inf inputs without a mask, is NaN as F.softmax gives it
    (the Triton kernel's row max skips NaN, so it once returned such rows unnormalised, with a
    single NaN: the intel/torch-xpu-ops#5022 and tenstorrent/tt-metal#56056 class); rows a mask
    hides entirely stay 0; NaN under a mask and 0 * inf through the scale are NaN too."""
    inf, nan = float("inf"), float("nan")
    x = torch.randn(6, 40)
    x[0] = -inf
    x[1, 7] = nan
    x[2, 9] = inf
    x[3, 0] = -inf
    x[4, 3] = -inf
    y = fastformer.softmax(x, backend=backend, _max_block=max_block)
    ref = torch.softmax(x, -1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    torch.testing.assert_close(y[3:], ref[3:])
    mask = torch.zeros(6, 40)
    mask[:, 1:] = -inf  # only column 0 survives
    xm = x.clone()
    xm[5, 0] = nan
    y = fastformer.softmax(xm, mask=mask, backend=backend, _max_block=max_block)
    # rows 0 and 3 see only -inf: hidden, 0; rows 1, 2 hold NaN / inf at masked columns (NaN and
    # inf + -inf are NaN, as torch's additive mask) and row 5 at column 0: NaN; row 4: one-hot.
    assert torch.equal(y[[0, 3]], torch.zeros(2, 40))
    assert torch.isnan(y[[1, 2, 5]]).all()
    assert torch.equal(y[4], torch.nn.functional.one_hot(torch.tensor(0), 40).float())
    y = fastformer.softmax(torch.tensor([[inf, 1.0]] * 2), scale=0.0, backend=backend, _max_block=max_block)
    assert torch.isnan(y).all()


def test_huge_logits_stay_finite():
    x = torch.tensor([[1e4, -1e4, 3e4, 0.0]], dtype=torch.float16).repeat(3, 1)
    y = fastformer.softmax(x, backend="triton")
    assert torch.equal(y, torch.softmax(x.float(), -1).half())


def test_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="dim"):
        fastformer.softmax(x, dim=2)
    with pytest.raises(ValueError, match="is_causal"):
        fastformer.softmax(x, dim=0, is_causal=True)
    with pytest.raises(TypeError, match="mask"):
        fastformer.softmax(x, mask=torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="broadcast"):
        fastformer.softmax(x, mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        fastformer.softmax(x, backend="nope")
    with pytest.raises(TypeError, match="floating"):
        fastformer.softmax(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="floating"):  # what torch.softmax raises for integers
        fastformer.softmax(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cuda"):
        fastformer.softmax(x, backend="cuda")


def test_opcheck():
    x = torch.randn(2, 2, 3, 19, requires_grad=True)
    mask = (torch.rand(1, 2, 1, 19) > 0.3).expand(2, 2, 3, 19)
    torch.library.opcheck(softmax_module._softmax_fwd_op, (x, mask, 0.7, True, 0))
    y = softmax_module._softmax_fwd_op(x.detach(), None, 0.7, False, 0)
    torch.library.opcheck(softmax_module._softmax_bwd_op, (torch.randn_like(y), y, 0.7, 0))


def test_float64_falls_back_to_torch():
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(fastformer.softmax(x, backend="triton"), torch.softmax(x, -1))


def test_compile_fullgraph():
    torch._dynamo.reset()
    mask = torch.rand(7, 30) > 0.2

    def fn(x):
        return fastformer.softmax(x * 2, scale=0.5, mask=mask, backend="triton").sum(-1, keepdim=True) * x

    x = torch.randn(3, 7, 30, requires_grad=True)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, fn(x))
    out.sum().backward()


@pytest.mark.cuda
@pytest.mark.parametrize("n", [768, 4096, 8192, 20000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_gpu_by_rule(n, dtype):
    x = torch.randn(4096 if n <= 8192 else 256, n, device="cuda") * 4
    check_by_rule(lambda t: fastformer.softmax(t, scale=0.3, backend="triton"),
                  lambda t: eager_softmax(t, scale=0.3), [x], dtype)


@pytest.mark.cuda
def test_softmax_gpu_causal_masked_bf16():
    x = torch.randn(2, 8, 512, 512, device="cuda")
    mask = torch.rand(2, 1, 512, 512, device="cuda") > 0.1
    check_by_rule(lambda t: fastformer.softmax(t, mask=mask, is_causal=True, backend="triton"),
                  lambda t: eager_softmax(t, mask=mask, is_causal=True), [x], torch.bfloat16)


@pytest.mark.cuda
def test_softmax_cuda_twin_matches_triton():
    from fastformer.ops.softmax import _cuda_twin_unavailable

    reason = _cuda_twin_unavailable()
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(2, 4, 300, 1000, device="cuda")
    mask = torch.rand(2, 1, 300, 1000, device="cuda") > 0.2
    check_by_rule(lambda t: fastformer.softmax(t, scale=0.5, mask=mask, is_causal=True, backend="cuda"),
                  lambda t: eager_softmax(t, scale=0.5, mask=mask, is_causal=True), [x], torch.bfloat16)
