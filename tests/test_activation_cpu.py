"""fastformer.ops.gelu: the CPU GELU-tanh kernel (csrc/cpu/activation_cpu.cpp), forward and
backward, and where "auto" uses it (the MLPs of GPT-2-style models run it through ops.feed_forward).

Correctness follows the project's rule: against a float64 reference on float64 copies of the
inputs, the kernel's error is at most 2× that of torch's own same-dtype computation (+ a tiny
atol). Lengths walk every vector remainder (1 … 2·16+1 elements and a large odd count split
across threads); special values must land where torch puts them.
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

activation_mod = importlib.import_module("fastformer.ops.activation")

pytestmark = pytest.mark.skipif(fastformer._ext.C is None or activation_mod._C is None,
                                reason="the compiled extension (with the activation kernel) is not built")

DTYPES = [torch.float32, torch.bfloat16]
SIZES = [1, 3, 4, 7, 15, 16, 17, 31, 33, 100, 4096, 100_003]


def _reference(x, g):
    """GELU-tanh and its input gradient in float64 from float64 copies."""
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    return y64.detach(), dx64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_forward_and_backward_follow_the_error_rule(dtype, n):
    torch.manual_seed(n)
    x = (torch.randn(n) * 3).to(dtype).requires_grad_()
    g = torch.randn(n).to(dtype)
    y = ops.gelu(x, approximate="tanh", backend="cpu")
    (dx,) = torch.autograd.grad(y, x, g)
    xt = x.detach().clone().requires_grad_()
    yt = F.gelu(xt, approximate="tanh")
    (dxt,) = torch.autograd.grad(yt, xt, g)
    y64, dx64 = _reference(x, g)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert_close_by_rule(y, y64, yt, "gelu")
    assert_close_by_rule(dx, dx64, dxt, "d gelu / dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_magnitude(dtype):
    """A dense sweep of [-12, 12] (both of the forward's branches, the overflow of exp(-2u)
    below x = -9.5) and tiny values: within the rule everywhere."""
    x = torch.cat([torch.linspace(-12, 12, 48_001), torch.logspace(-30, -1, 301), -torch.logspace(-30, -1, 301)]).to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    y64, dx64 = _reference(x, g)
    assert_close_by_rule(ops.gelu(x, approximate="tanh", backend="cpu"), y64, F.gelu(x, approximate="tanh"))
    assert_close_by_rule(activation_mod._C.gelu_tanh_backward_cpu(g, x), dx64,
                         torch.ops.aten.gelu_backward(g, x, approximate="tanh"), "backward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_land_where_torch_puts_them(dtype):
    """NaN, ±inf, overflowing cubes and huge magnitudes: NaN and inf exactly where torch has them,
    finite values equal to torch's within a float32 rounding of their scale."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e20, -1e20, 3e38, -3e38, -20.0, -9.6, -9.4,
                      0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4], dtype=torch.float32).to(dtype)
    g = torch.ones_like(x)
    for ours, theirs in ((ops.gelu(x, approximate="tanh", backend="cpu"), F.gelu(x, approximate="tanh")),
                         (activation_mod._C.gelu_tanh_backward_cpu(g, x),
                          torch.ops.aten.gelu_backward(g, x, approximate="tanh"))):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), (ours, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (ours, theirs)
        finite = torch.isfinite(theirs)
        assert torch.equal(ours[torch.isinf(ours)], theirs[torch.isinf(theirs)])
        scale = theirs[finite].float().abs().clamp_min(1.0)
        assert ((ours[finite].float() - theirs[finite].float()).abs() <= 1e-6 * scale).all(), (ours, theirs)


def test_strided_input_and_shape():
    """A transposed, sliced input is read through a contiguous copy; the result has x's shape."""
    torch.manual_seed(1)
    base = torch.randn(40, 70)
    x = base.t()[5:60]
    g = torch.randn(x.shape)
    y = ops.gelu(x, approximate="tanh", backend="cpu")
    assert y.shape == x.shape
    y64, dx64 = _reference(x, g)
    assert_close_by_rule(y, y64, F.gelu(x, approximate="tanh"))
    assert_close_by_rule(activation_mod._C.gelu_tanh_backward_cpu(g, x), dx64,
                         torch.ops.aten.gelu_backward(g, x, approximate="tanh"))


def test_broadcast_gradient():
    """``y.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    torch.manual_seed(5)
    x = torch.randn(64, 130, requires_grad=True)
    ops.gelu(x, approximate="tanh", backend="cpu").sum().backward()
    xt = x.detach().clone().requires_grad_()
    F.gelu(xt, approximate="tanh").sum().backward()
    _, dx64 = _reference(x, torch.ones(x.shape))
    assert_close_by_rule(x.grad, dx64, xt.grad)


def test_empty_tensor():
    for shape in [(0,), (3, 0, 5)]:
        x = torch.randn(shape, requires_grad=True)
        y = ops.gelu(x, approximate="tanh", backend="cpu")
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_double_backward_uses_torchs_formula():
    """create_graph=True: the backward is torch's differentiable gelu_backward, so second
    derivatives equal F.gelu's."""
    torch.manual_seed(2)
    x = torch.randn(5000, dtype=torch.float32, requires_grad=True)
    (g1,) = torch.autograd.grad(ops.gelu(x, approximate="tanh").sum(), x, create_graph=True)
    (h1,) = torch.autograd.grad(g1.sum(), x)
    xt = x.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(F.gelu(xt, approximate="tanh").sum(), xt, create_graph=True)
    (h2,) = torch.autograd.grad(g2.sum(), xt)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(h1, h2)


def test_auto_routing():
    """auto: the kernel for a large float32/bfloat16 CPU tensor with approximate="tanh"; F.gelu for
    the exact GELU, small tensors, float64 and under use_kernel_backend("torch")."""
    calls = []
    real = activation_mod._GeluTanh.apply

    def spy(x):
        calls.append(x.shape)
        return real(x)

    activation_mod._GeluTanh.apply = spy
    try:
        big = torch.randn(8, 1024)
        ops.gelu(big, approximate="tanh")
        ops.gelu(big.bfloat16(), approximate="tanh")
        assert len(calls) == 2
        ops.gelu(big)  # exact GELU
        ops.gelu(torch.randn(10), approximate="tanh")  # small
        ops.gelu(big.double(), approximate="tanh")
        with ops.kernel_backend.use_kernel_backend("torch"):
            ops.gelu(big, approximate="tanh")
        assert len(calls) == 2
    finally:
        activation_mod._GeluTanh.apply = real


def test_traces_transforms_and_subclasses_get_f_gelu():
    """The kernel writes through raw pointers: torch.jit.trace, vmap and a tensor subclass with
    __torch_function__ must see F.gelu (a traced graph with the kernel baked in would return the
    example's answer for every input)."""
    torch.manual_seed(3)

    def f(x):
        return ops.gelu(x, approximate="tanh")

    traced = torch.jit.trace(f, torch.randn(8, 1024), check_trace=False)
    x2 = torch.randn(8, 1024)
    torch.testing.assert_close(traced(x2), F.gelu(x2, approximate="tanh"))
    xs = torch.randn(3, 8, 1024)
    torch.testing.assert_close(torch.vmap(f)(xs), F.gelu(xs, approximate="tanh"))
    seen = []
    ops.gelu(logged(torch.randn(8, 1024), seen), approximate="tanh")
    assert F.gelu in seen
    with pytest.raises(ValueError, match="invisible"):
        ops.gelu(logged(torch.randn(8, 1024), seen), approximate="tanh", backend="cpu")


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="approximate='tanh'"):
        ops.gelu(torch.randn(10), backend="cpu")
    with pytest.raises(TypeError, match="input must be float32 or bfloat16"):
        ops.gelu(torch.randn(10, dtype=torch.float64), approximate="tanh", backend="cpu")
    with pytest.raises(ValueError, match="backend must be"):
        ops.gelu(torch.randn(10), approximate="tanh", backend="triton")
    with pytest.raises(ValueError, match="grad_output .* and input .* must have one shape"):
        activation_mod._C.gelu_tanh_backward_cpu(torch.randn(3), torch.randn(4))
    with pytest.raises(TypeError, match="grad_output .* and input .* must have one dtype"):
        activation_mod._C.gelu_tanh_backward_cpu(torch.randn(3), torch.randn(3).bfloat16())


def test_gpt_training_step_equal_with_the_kernel_on_and_off():
    """GPT's MLP (gelu_tanh) runs the kernel in training; loss and gradients match the torch path."""
    from fastformer.models import GPT, GPTConfig

    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=37, block_size=32, n_layer=2, n_head=2, n_embd=64))
    ids, tgt = torch.randint(0, 37, (2, 32)), torch.randint(0, 37, (2, 32))
    calls = []
    real = activation_mod._GeluTanh.apply
    activation_mod._GeluTanh.apply = lambda x: calls.append(1) or real(x)
    try:
        _, loss = model(ids, tgt)
        loss.backward()
    finally:
        activation_mod._GeluTanh.apply = real
    assert len(calls) == 2, "each layer's MLP should run the kernel"
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with ops.kernel_backend.use_kernel_backend("torch"):
        _, loss_t = model(ids, tgt)
        loss_t.backward()
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


_ISA_SCRIPT = r"""
import sys, torch
import torch.nn.functional as F
sys.path.insert(0, "tests")
from error_rule import assert_close_by_rule
import fastformer
from fastformer import ops
want = {"avx512_bf16": "avx512"}.get(sys.argv[1], sys.argv[1])  # bf16 values are widened either way
assert fastformer._ext.C.activation_cpu_isa() == want, fastformer._ext.C.activation_cpu_isa()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for n in (1, 3, 5, 9, 17, 31, 33, 70_001):
        x = (torch.randn(n) * 4).to(dtype)
        g = torch.randn(n).to(dtype)
        x64 = x.double().requires_grad_()
        y64 = F.gelu(x64, approximate="tanh")
        (dx64,) = torch.autograd.grad(y64, x64, g.double())
        assert_close_by_rule(ops.gelu(x, approximate="tanh", backend="cpu"), y64.detach(), F.gelu(x, approximate="tanh"))
        assert_close_by_rule(fastformer._ext.C.gelu_tanh_backward_cpu(g, x), dx64,
                             torch.ops.aten.gelu_backward(g, x, approximate="tanh"))
print("ok")
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_isa_variants(variant):
    """Each variant this processor can run (FASTFORMER_CPU_ISA forces one), in a fresh process."""
    run_under_variant(variant, _ISA_SCRIPT)


def test_replayed_reports_of_other_gelu_tanh_kernels():
    """Inputs from public bug reports of other GELU-tanh kernels, each a class of failure:

    * pytorch/pytorch#186278 (MPS): bf16 ``arange(8, 16, 0.5)`` came back NaN from 10.5 up;
    * pytorch/executorch#22323, intel/llm-scaler#484: tanh through an overflowing exp gave
      inf/inf = NaN for |x| past ~11-13;
    * tensorflow/tensorflow#47724: gradients over ``linspace(-500, 500)`` diverged;
    * tenstorrent/tt-metal#56517: ``1 + tanh(u)`` cancels for x < -4, so the negative tail
      collapsed to a few values and then to 0 (torch's CPU formula shares this: the kernel's
      ``x / (1 + exp(-2u))`` keeps the tail's relative accuracy).
    """
    x = torch.arange(8, 16, 0.5, dtype=torch.bfloat16)
    assert torch.equal(ops.gelu(x, approximate="tanh", backend="cpu"), F.gelu(x, approximate="tanh"))
    for dtype in DTYPES:
        x = torch.linspace(-500, 500, 5001).to(dtype)
        g = torch.ones_like(x)
        y64, dx64 = _reference(x, g)
        y = ops.gelu(x, approximate="tanh", backend="cpu")
        dx = activation_mod._C.gelu_tanh_backward_cpu(g, x)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
        assert_close_by_rule(y, y64, F.gelu(x, approximate="tanh"))
        assert_close_by_rule(dx, dx64, torch.ops.aten.gelu_backward(g, x, approximate="tanh"), "backward")
    x = torch.linspace(-9, -4, 5001)
    # F.gelu's own float64 formula cancels here too (tanh(u) == -1 in float64 below x = -5.5):
    # the reference is the same function written without the cancellation.
    x64 = x.double()
    y64 = x64 / (1 + torch.exp(-2 * 0.7978845608028654 * (x64 + 0.044715 * x64**3)))
    rel = ((ops.gelu(x, approximate="tanh", backend="cpu").double() - y64).abs() / y64.abs()).max().item()
    # exp(-2u) at u ~ -60 has condition number 120: fp32's rounding of u alone moves it ~1e-5.
    assert rel < 1e-4, f"negative tail: relative error {rel:.2e} (torch's own: up to 100 %)"


def test_forward_mode_ad_and_memory_format_follow_f_gelu():
    """Forward-mode AD (dual tensors) gets F.gelu: the raw-pointer kernel would drop the tangent
    (ops.linear's kernel too, for a decoding-size call); a channels_last input keeps its memory
    format as F.gelu does; the argument is F.gelu's ``input``."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(6)
    x, t = torch.randn(8, 1024), torch.randn(8, 1024)
    w = torch.randn(600, 1024) * 0.03
    with fwAD.dual_level():
        y = ops.gelu(fwAD.make_dual(x, t), approximate="tanh")
        yl = ops.linear(fwAD.make_dual(x[:1], t[:1]), w)
        tangent, tangent_l = fwAD.unpack_dual(y).tangent, fwAD.unpack_dual(yl).tangent
    assert tangent is not None and tangent_l is not None
    torch.testing.assert_close(tangent, torch.ops.aten.gelu_backward(t, x, approximate="tanh"))
    torch.testing.assert_close(tangent_l, t[:1] @ w.t(), rtol=1e-4, atol=1e-5)
    xc = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    assert ops.gelu(xc, approximate="tanh").stride() == F.gelu(xc, approximate="tanh").stride()
    torch.testing.assert_close(ops.gelu(input=x, approximate="tanh"), F.gelu(x, approximate="tanh"))
