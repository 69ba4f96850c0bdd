"""fastformer.ops.linear: the CPU decoding GEMM (csrc/cpu/linear_cpu.cpp) and where "auto" uses it.

Correctness follows the project's rule: against a float64 reference on float64 copies of the
inputs, the kernel's error is at most 2× that of torch's own ``F.linear`` in the same dtype
(+ a tiny atol). The shapes walk every remainder of the kernel: K past the vector width, N past
the 4-row groups, x rows past the per-pass count, strided weights.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastformer
from error_rule import assert_close_by_rule
from fastformer import ops
from isa_variants import VARIANTS, run_under_variant
from logged_tensor import logged

linear_mod = importlib.import_module("fastformer.ops.linear")  # the module (ops.linear is the function)

pytestmark = pytest.mark.skipif(fastformer._ext.C is None, reason="the compiled extension is not built")

DTYPES = [torch.float32, torch.bfloat16]


def _check(x, w, b, backend="cpu"):
    with torch.no_grad():
        y = ops.linear(x, w, b, backend=backend)
        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        theirs = F.linear(x, w, b)
    assert y.dtype == x.dtype and y.shape == theirs.shape
    assert_close_by_rule(y, ref, theirs)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (5, 16), (37, 33), (130, 17), (64, 384), (9, 1000)])
def test_matches_reference(dtype, M, N, K):
    torch.manual_seed(M * 1000 + N * 10 + K)
    x, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
    _check(x, w, b)
    _check(x, w, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(dtype):
    """Leading dims of x, a weight with a row stride (a slice of a wider matrix, as
    MultiheadAttention's packed in_proj), a non-contiguous x and bias."""
    torch.manual_seed(1)
    big = torch.randn(40, 100).to(dtype)
    w = big[3:30, 10:77]  # (27, 67), row stride 100
    assert w.stride() == (100, 1)
    x = torch.randn(2, 1, 67).to(dtype)
    b = torch.randn(54).to(dtype)[::2]
    y = _check(x, w, b)
    assert y.shape == (2, 1, 27)
    xt = torch.randn(67, 3).to(dtype).t()  # (3, 67), K stride 3
    _check(xt, w, b)


def test_large_threaded():
    """A weight big enough to be split over threads, rows not a multiple of the split."""
    torch.manual_seed(2)
    x, w, b = torch.randn(3, 515), torch.randn(2051, 515), torch.randn(2051)
    _check(x, w, b)


def test_special_values_follow_torch():
    """inf, NaN and float32 overflow land where F.linear puts them."""
    w = torch.randn(12, 40)
    x = torch.randn(2, 40)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    w[7] = 0.0
    y, theirs = ops.linear(x, w, backend="cpu"), F.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(theirs))
    assert torch.equal(torch.isinf(y), torch.isinf(theirs))
    big = torch.full((1, 64), 1e30)
    assert torch.equal(ops.linear(big, torch.full((5, 64), 1e10), backend="cpu"), F.linear(big, torch.full((5, 64), 1e10)))


def test_bf16_rounds_once():
    """bf16 output is the float32 sum (bias included) rounded to nearest even once."""
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 96).bfloat16(), torch.randn(20, 96).bfloat16(), torch.randn(20).bfloat16()
    exact = F.linear(x.double(), w.double(), b.double()).float()
    y = ops.linear(x, w, b, backend="cpu")
    # One rounding of a float32 value within a few float32 ulps of the exact sum.
    assert (y.float() - exact).abs().le(exact.abs() * 2.0**-8 + 1e-6).all()


def test_auto_routing():
    """auto: the kernel for a decoding step, F.linear itself for gradients, autocast, many rows,
    small weights and under use_kernel_backend('torch')."""
    torch.manual_seed(4)
    K, N = 384, 512  # 768 KiB of float32: above CPU_AUTO_MIN_WEIGHT_BYTES
    w = torch.randn(N, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    x = torch.randn(1, 1, K)
    with torch.no_grad():
        kernel = ops.linear(x, w, b, backend="cpu")
        assert torch.equal(ops.linear(x, w, b), kernel)
        torch_y = F.linear(x, w, b)
        with ops.kernel_backend.use_kernel_backend("torch"):
            assert torch.equal(ops.linear(x, w, b), torch_y)
        many = torch.randn(linear_mod.CPU_AUTO_MAX_ROWS[torch.float32] + 1, K)
        assert torch.equal(ops.linear(many, w, b), F.linear(many, w, b))
        small = torch.randn(16, K)  # 24 KiB weight
        assert torch.equal(ops.linear(x, small), F.linear(x, small))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.linear(x, w, b)
            assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, w, b))
    y = ops.linear(x, w, b)  # grad enabled, parameters require it: torch's autograd path
    assert y.requires_grad and torch.equal(y, F.linear(x, w, b))
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    with torch.inference_mode():
        assert torch.equal(ops.linear(x, w.detach(), b.detach()), kernel)


@pytest.mark.parametrize("bad, match", [
    (lambda x, w, b: (x.half(), w.half(), None), "float32 or bfloat16"),
    (lambda x, w, b: (x, w.double(), None), "float32 or bfloat16"),
    (lambda x, w, b: (x.bfloat16(), w, b), "one dtype"),
    (lambda x, w, b: (x[:, :5], w, b), "last dim"),
    (lambda x, w, b: (x, w.t().contiguous().t(), b), "unit stride"),
    (lambda x, w, b: (x, w, b[:3]), "bias"),
    (lambda x, w, b: (x, w, b.bfloat16()), "bias"),
    (lambda x, w, b: (x[:0], w, b), "row count"),
    (lambda x, w, b: (x, w[0], b), "weight"),
])
def test_bad_input_names_the_problem(bad, match):
    x, w, b = torch.randn(2, 8), torch.randn(8, 8), torch.randn(8)
    with pytest.raises(ValueError, match=match):
        ops.linear(*bad(x, w, b), backend="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        ops.linear(x, w, b, backend="cuda")


def test_auto_falls_back_on_what_the_kernel_does_not_take():
    """Valid inputs outside the kernel (float16, float64, empty rows) give F.linear's answer under auto."""
    w = torch.randn(600, 600)
    for x, ww in ((torch.randn(1, 600).double(), w.double()), (torch.randn(1, 600).half(), w.half()),
                  (torch.randn(0, 600), w)):
        with torch.no_grad():
            assert torch.equal(ops.linear(x, ww), F.linear(x, ww))


def test_decode_step_of_models_uses_it():
    """The GPT decoding loop and MultiheadAttention's projections go through ops.linear; greedy
    tokens match the same model with the kernel switched off (use_kernel_backend('torch'))."""
    from fastformer.models import GPT, GPTConfig

    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_embd=256)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 50, (1, 5))
    calls = []
    real = linear_mod._ext.C.linear_cpu_auto

    def spy(*a):
        y = real(*a)
        calls.append(y is not None)
        return y

    linear_mod._ext.C.linear_cpu_auto = spy
    try:
        ours = model.generate(prompt, max_new_tokens=12, temperature=0)
    finally:
        linear_mod._ext.C.linear_cpu_auto = real
    assert sum(calls) > 0, "no projection of the decoding step ran the CPU kernel"
    with ops.kernel_backend.use_kernel_backend("torch"):
        theirs = model.generate(prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(ours, theirs)


_ISA_SCRIPT = r"""
import sys, torch
import torch.nn.functional as F
sys.path.insert(0, "tests")
from error_rule import assert_close_by_rule
import fastformer
from fastformer import ops
assert fastformer._ext.C.linear_cpu_isa() == sys.argv[1], fastformer._ext.C.linear_cpu_isa()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for M in (1, 2, 3, 4, 5, 9):
        for N, K in ((1, 1), (7, 9), (37, 33), (130, 70), (64, 384), (5, 31), (6, 64), (9, 95)):
            x, w, b = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype), torch.randn(N).to(dtype)
            y = ops.linear(x, w, b, backend="cpu")
            assert_close_by_rule(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))
print("ok")
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_isa_variants(variant):
    """Each variant this processor can run (FASTFORMER_CPU_ISA forces one), in a fresh process.
    avx512_bf16 multiplies bf16 problems as bf16 pairs (vdpbf16ps), including K tails of 1-31."""
    run_under_variant(variant, _ISA_SCRIPT)


def test_vector_input_as_f_linear():
    """A 1-D x (in_features,) gives (out_features,), as F.linear."""
    torch.manual_seed(6)
    x, w, b = torch.randn(300), torch.randn(700, 300), torch.randn(700)
    with torch.no_grad():
        y = ops.linear(x, w, b)
        assert y.shape == (700,)
        assert_close_by_rule(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))


def test_traces_transforms_and_subclasses_get_f_linear():
    """The kernel writes through raw pointers: torch.jit.trace, vmap and a tensor subclass with
    __torch_function__ must see F.linear (a traced graph that baked the kernel's output in would
    return the example's answer for every input)."""
    torch.manual_seed(7)
    w, b = torch.randn(600, 500), torch.randn(600)

    def f(x):
        return ops.linear(x, w, b)

    with torch.no_grad():
        traced = torch.jit.trace(f, torch.randn(1, 500), check_trace=False)
        x2 = torch.randn(1, 500)
        assert torch.allclose(traced(x2), F.linear(x2, w, b), rtol=1e-5, atol=1e-5)
        xs = torch.randn(3, 1, 500)
        assert torch.allclose(torch.vmap(f)(xs), F.linear(xs, w, b), rtol=1e-5, atol=1e-5)

    seen = []
    with torch.no_grad():
        ops.linear(logged(torch.randn(1, 500), seen), w, b)
    assert F.linear in seen
    with pytest.raises(ValueError, match="invisible"):
        ops.linear(logged(torch.randn(1, 500), seen), w, b, backend="cpu")


def test_hooked_projection_is_called_as_a_module():
    """nn.Attention calls a hooked (or replaced) projection as a module, so the hook fires."""
    from fastformer.nn import Attention

    attn = Attention(384, num_heads=6).eval()
    fired = []
    attn.qkv.register_forward_hook(lambda mod, inp, out: fired.append(out.shape))
    with torch.no_grad():
        attn(torch.randn(1, 1, 384))
    assert fired == [torch.Size([1, 1, 1152])]


def test_dispatch_modes_see_the_matmul():
    """FlopCounterMode (any dispatch mode) sees F.linear's matmul, not an opaque C++ call."""
    from torch.utils.flop_counter import FlopCounterMode

    w, b = torch.randn(600, 500), torch.randn(600)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ops.linear(torch.randn(1, 500), w, b)
    assert counter.get_total_flops() == 2 * 600 * 500
