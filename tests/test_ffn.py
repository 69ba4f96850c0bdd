"""Fused linear + activation, gated linear, feed_forward and nn.FeedForward."""

import pytest
import torch
import torch.nn.functional as F

import fastformer.nn as fnn
from fastformer import ops
from fastformer.ops.ffn import ACTIVATIONS, _gated_bwd_op, _gated_fwd_op, _linear_act_bwd_op, _linear_act_fwd_op
from fused_checks import check_by_rule


def act_torch(h, activation):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](h)


def eager_linear_act(activation):
    return lambda x, w, b: act_torch(F.linear(x, w, b), activation)


def eager_gated(activation):
    def fn(x, w, b):
        a, g = F.linear(x, w, b).chunk(2, dim=-1)
        return act_torch(a, activation) * g
    return fn


CASES = [((6, 42), 123), ((2, 21, 40), 35)]


def _inputs(x_shape, n_out, bias=True):
    k = x_shape[-1]
    return [torch.randn(x_shape), torch.randn(n_out, k) / k**0.5, torch.randn(n_out) if bias else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=["6x42to123", "2x21x40to35"])
def test_linear_act_triton_by_rule(case, activation, dtype):
    ours = lambda x, w, b: ops.linear_act(x, w, b, activation, backend="triton")  # noqa: E731
    check_by_rule(ours, eager_linear_act(activation), _inputs(*case), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_linear_triton_by_rule(activation, dtype):
    ours = lambda x, w, b: ops.gated_linear(x, w, b, activation, backend="triton")  # noqa: E731
    check_by_rule(ours, eager_gated(activation), _inputs((2, 19, 40), 2 * 37), dtype)


@pytest.mark.parametrize("gated", [False, True])
def test_no_bias(gated):
    fn = ops.gated_linear if gated else ops.linear_act
    x, w, _ = _inputs((27, 33), 2 * 20)
    check_by_rule(lambda x, w: fn(x, w, None, "gelu", backend="triton"),
                  lambda x, w: (eager_gated if gated else eager_linear_act)("gelu")(x, w, None), [x, w], torch.float32)


def test_input_only_grad_and_inference_store_nothing():
    x, w, b = _inputs((9, 40), 24)
    x.requires_grad_()
    check_by_rule(lambda x, w, b: ops.linear_act(x, w, b, "silu", backend="triton"), eager_linear_act("silu"),
                  [x, w, b], torch.float32, grad=[True, False, False])
    with torch.no_grad():
        torch.testing.assert_close(ops.linear_act(x, w, b, "gelu", backend="triton"), F.gelu(F.linear(x, w, b)))


@pytest.mark.parametrize("gated", [False, True])
def test_torch_path_on_cpu(gated):
    x, w, b = _inputs((3, 10, 32), 2 * 24)
    fn = ops.gated_linear if gated else ops.linear_act
    check_by_rule(lambda x, w, b: fn(x, w, b, "gelu"), (eager_gated if gated else eager_linear_act)("gelu"),
                  [x, w, b], torch.float32)


@pytest.mark.parametrize("gated", [False, True])
def test_feed_forward_by_rule(gated):
    d, hidden = 24, 40
    x = torch.randn(3, 7, d)
    w1, b1 = torch.randn(hidden * (2 if gated else 1), d) / d**0.5, torch.randn(hidden * (2 if gated else 1))
    w2, b2 = torch.randn(d, hidden) / hidden**0.5, torch.randn(d)
    first = eager_gated("silu") if gated else eager_linear_act("silu")
    check_by_rule(lambda x, w1, b1, w2, b2: ops.feed_forward(x, w1, b1, w2, b2, "silu", gated=gated, backend="triton"),
                  lambda x, w1, b1, w2, b2: F.linear(first(x, w1, b1), w2, b2), [x, w1, b1, w2, b2], torch.float32)


def test_feedforward_module_loads_transformer_layer_weights():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
    ff = fnn.FeedForward(32, 64, activation="gelu")
    missing = ff.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("linear")})
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ff(x), layer.linear2(F.gelu(layer.linear1(x))))


@pytest.mark.parametrize("activation", ["silu", F.relu, torch.tanh])
def test_feedforward_module_gated_and_callables(activation):
    ff = fnn.FeedForward(16, 24, activation=activation, gated=True, bias=False, dtype=torch.float64)
    assert ff.linear1.weight.shape == (48, 16) and ff.linear1.bias is None
    x = torch.randn(4, 16, dtype=torch.float64)
    fn = activation if callable(activation) else F.silu
    a, g = ff.linear1(x).chunk(2, -1)
    torch.testing.assert_close(ff(x), ff.linear2(fn(a) * g))


def test_feedforward_dropout_only_in_training():
    ff = fnn.FeedForward(16, 32, dropout=0.5)
    x = torch.randn(8, 16)
    ff.eval()
    torch.testing.assert_close(ff(x), ff.linear2(F.gelu(ff.linear1(x))))
    ff.train()
    assert not torch.allclose(ff(x), ff.linear2(F.gelu(ff.linear1(x))))


def test_errors():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="activation"):
        ops.linear_act(x, w, None, "tanh")
    with pytest.raises(ValueError, match="in_features"):
        ops.linear_act(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match="bias"):
        ops.linear_act(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="2 \\* hidden"):
        ops.gated_linear(x, torch.randn(5, 8))
    with pytest.raises(TypeError, match="dtype"):
        ops.linear_act(x, w.double())
    with pytest.raises(ValueError, match="activation"):
        fnn.FeedForward(8, 16, activation="swish")


def test_opcheck():
    x, w, b = (t.requires_grad_() for t in _inputs((10, 16), 12))
    torch.library.opcheck(_linear_act_fwd_op, (x, w, b, 2, True))
    torch.library.opcheck(_gated_fwd_op, (x, w, b, 4, True))
    y, pre = _linear_act_fwd_op(x.detach(), w.detach(), b.detach(), 2, True)
    torch.library.opcheck(_linear_act_bwd_op, (torch.randn_like(y), x.detach(), w.detach(), pre, 2, True))
    out, pre = _gated_fwd_op(x.detach(), w.detach(), b.detach(), 4, True)
    torch.library.opcheck(_gated_bwd_op, (torch.randn_like(out), x.detach(), w.detach(), pre, 4, True))


def test_compile_fullgraph():
    torch._dynamo.reset()
    w, b = torch.randn(20, 16, requires_grad=True), torch.randn(20, requires_grad=True)

    def fn(x):
        return ops.linear_act(x * 2, w, b, "gelu", backend="triton").sum(-1)

    x = torch.randn(6, 16, requires_grad=True)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, fn(x))
    out.sum().backward()
    assert w.grad is not None and x.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_act_gpu_bf16_by_rule(activation):
    x, w, b = (t.cuda() for t in _inputs((4096, 768), 3072))
    check_by_rule(lambda x, w, b: ops.linear_act(x, w, b, activation, backend="triton"), eager_linear_act(activation),
                  [x, w, b], torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_gpu_bf16_by_rule(activation):
    x, w, b = (t.cuda() for t in _inputs((2048, 1024), 2 * 2730))
    check_by_rule(lambda x, w, b: ops.gated_linear(x, w, b, activation, backend="triton"), eager_gated(activation),
                  [x, w, b], torch.bfloat16)


@pytest.mark.cuda
def test_linear_act_gpu_fp32_no_tf32():
    x, w, b = (t.cuda() for t in _inputs((1024, 512), 1536))
    check_by_rule(lambda x, w, b: ops.linear_act(x, w, b, "gelu", backend="triton"), eager_linear_act("gelu"),
                  [x, w, b], torch.float32)


@pytest.mark.cuda
def test_feedforward_module_gpu_bf16():
    ff = fnn.FeedForward(768, 3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 512, 768, device="cuda", dtype=torch.bfloat16)
    check_by_rule(lambda x, w1, b1, w2, b2: ops.feed_forward(x, w1, b1, w2, b2, "gelu"),
                  lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
                  [x, *(p.detach().float() for p in (ff.linear1.weight, ff.linear1.bias, ff.linear2.weight,
                                                       ff.linear2.bias))], torch.bfloat16)


def test_dropout_one_drops_everything():
    """dropout_p = 1 is legal in torch (F.dropout gives zeros): Mlp(drop=1.0) in training gives
    timm's answer, zeros, with zero gradients (it raised "must be in [0, 1)")."""
    m = fnn.Mlp(8, 16, drop=1.0).train()
    x = torch.randn(2, 8, requires_grad=True)
    y = m(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.feed_forward(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, dropout_p=1.5)


class _LoraLinear(torch.nn.Module):
    """A stand-in for peft's LoRA wrapper: the base linear plus a low-rank update; its ``weight``
    is the base's, so a fused op reading ``.weight`` would silently drop the update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.5)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b)


@pytest.mark.parametrize("gated", [False, True])
def test_replaced_or_hooked_linears_are_called(gated):
    """LoRA-style replaced or hooked linears inside Mlp / FeedForward are called as modules, as in
    timm's Mlp and torch (they were read as ``.weight``/``.bias``: the update and the hooks were
    silently skipped; found reviewing the forward docstrings)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for make, first, second in ((lambda: fnn.Mlp(8, 16, act_layer="gelu", gated=gated), "fc1", "fc2"),
                                (lambda: fnn.FeedForward(8, 16, "gelu", gated=gated), "linear1", "linear2")):
        m = make().eval()
        lin1, lin2 = getattr(m, first), getattr(m, second)

        def expected():
            h = lin1(x) if not isinstance(getattr(m, first), _LoraLinear) else getattr(m, first)(x)
            if gated:
                a, b = h.chunk(2, dim=-1)
                h = F.gelu(a) * b
            else:
                h = F.gelu(h)
            return getattr(m, second)(h)

        setattr(m, first, _LoraLinear(lin1))
        torch.testing.assert_close(m(x), expected())
        setattr(m, first, lin1)
        plain = m(x)
        handle = lin2.register_forward_hook(lambda mod, inp, out: out * 2)
        torch.testing.assert_close(m(x), 2 * plain)
        handle.remove()
