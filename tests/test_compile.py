"""The attention ops are torch.library custom ops: opcheck passes and torch.compile
(fullgraph=True) traces a model using them with no graph break, forward and backward."""

import pytest
import torch

import fastformer
from attention_cases import require_backend
from fastformer.ops.attention.fused import attention_bwd, attention_fwd


def _args(mask=None, dropout_p=0.0, causal=False, backend="naive", window=(-1, -1), slopes=None, softcap=0.0):
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, requires_grad=True)
    v = torch.randn(2, 2, 11, 6, requires_grad=True)
    rng = torch.randint(0, 2**31 - 1, (2,)) if dropout_p else None
    return (q, k, v, mask, rng, slopes, dropout_p, causal, False, 8**-0.5, *window, softcap, backend)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"causal": True}, {"mask": torch.rand(9, 11) > 0.3}, {"dropout_p": 0.2},
     {"window": (3, 1), "slopes": torch.rand(2, 4), "softcap": 2.0, "causal": True}],
    ids=["plain", "causal", "bool_mask", "dropout", "variants"],
)
def test_opcheck_attention_fwd(kwargs):
    torch.library.opcheck(attention_fwd, _args(**kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"window": (3, 1), "slopes": torch.rand(2, 4), "softcap": 2.0}],
                         ids=["plain", "variants"])
def test_opcheck_attention_bwd(kwargs):
    q, k, v, *rest = _args(**kwargs)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = attention_fwd(q, k, v, *rest)
    dout = torch.randn_like(out)
    torch.library.opcheck(attention_bwd, (dout, q, k, v, out, lse, *rest))


class TinyAttentionModel(torch.nn.Module):
    def __init__(self, dim=32, heads=4, backend="naive", variants=False):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.heads, self.backend = heads, backend
        self.register_buffer("slopes", torch.rand(heads) if variants else None)
        self.variants = variants

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, L, d)
        if self.variants:
            y = fastformer.attention(q, k, v, is_causal=True, window_size=(3, 0), alibi_slopes=self.slopes,
                                     softcap=5.0, backend=self.backend)
        else:
            y = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


@pytest.mark.parametrize("backend", ["naive", "reference", "auto", "cpu"])
def test_compile_fullgraph_forward_backward(backend):
    if backend != "auto":
        require_backend(backend)
    torch._dynamo.reset()
    model = TinyAttentionModel(backend=backend)
    x = torch.randn(2, 10, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_out = model(x)
    out = compiled(x)
    torch.testing.assert_close(out, eager_out)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager_out.sum().backward()
    for g, e in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", ["naive", "reference", "auto", "cpu"])
def test_compile_fullgraph_variants(backend):
    """window_size / alibi_slopes / softcap trace through torch.compile(fullgraph=True), fwd + bwd."""
    if backend != "auto":
        require_backend(backend)
    torch._dynamo.reset()
    model = TinyAttentionModel(backend=backend, variants=True)
    x = torch.randn(2, 10, 32)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    eager_out = model(x)
    torch.testing.assert_close(out, eager_out)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager_out.sum().backward()
    for g, e in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, e)


def test_compile_fullgraph_inductor_naive():
    torch._dynamo.reset()
    model = TinyAttentionModel(backend="naive")
    x = torch.randn(2, 10, 32)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_compile_in_a_fresh_process():
    """The first call of a fresh process may be inside a trace: no backend import may happen there."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, fastformer\n"
        "q = torch.randn(1, 2, 8, 16, requires_grad=True)\n"
        "f = torch.compile(lambda q: fastformer.scaled_dot_product_attention(q, q, q, is_causal=True),"
        " fullgraph=True, backend='aot_eager')\n"
        "f(q).sum().backward()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
