"""RoPE (apply_rotary, RotaryEmbedding) and sinusoidal encodings (add_sinusoidal_positions, module)."""

import math

import pytest
import torch

import fastformer.nn as fnn
from fastformer import ops
from fastformer.ops.rope import _rotary_op, rotary_inv_freq
from fastformer.ops.sinusoidal import _add_sinusoidal_op, sinusoidal_inv_freq
from fused_checks import check_by_rule


def hf_rotary(q, k, positions=None, base=10000.0, interleaved=False):
    """The HF Llama recipe in the inputs' dtype (cos/sin from fp32, cast to the dtype)."""
    B, _, L, D = q.shape
    dev = q.device
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64, device=dev).float() / D))
    pos = torch.arange(L, device=dev).float()[None] if positions is None else positions.float().reshape(-1, L)
    freqs = pos[..., None] * inv_freq  # (Bp, L, D/2)
    if q.dtype == torch.float64:  # the float64 reference: every step in float64
        inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64, device=dev) / D))
        freqs = (pos.double()[..., None] * inv_freq)
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None].to(q.dtype), emb.sin()[:, None].to(q.dtype)

    def rot(x):
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("positions", ["none", "shared", "per_batch"])
def test_rotary_triton_by_rule(positions, interleaved, dtype):
    B, Hq, Hk, L, D = 2, 4, 2, 42, 24
    pos = {"none": None, "shared": torch.randint(0, 500, (L,)), "per_batch": torch.randint(0, 500, (B, L))}[positions]
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hk, L, D)
    check_by_rule(lambda q, k: ops.apply_rotary(q, k, pos, interleaved=interleaved, backend="triton"),
                  lambda q, k: hf_rotary(q, k, pos, interleaved=interleaved), [q, k], dtype)


def test_rotary_torch_path_and_noncontiguous():
    q = torch.randn(2, 6, 3, 16).transpose(1, 2)  # (2, 3, 6, 16), strided
    k = torch.randn(2, 1, 6, 16)
    for backend in ("auto", "triton"):
        check_by_rule(lambda q, k: ops.apply_rotary(q, k, base=500.0, backend=backend),
                      lambda q, k: hf_rotary(q, k, base=500.0), [q, k], torch.float32)


def test_rotary_module_and_errors():
    rope = fnn.RotaryEmbedding(8)
    assert len(rope.state_dict()) == 0
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    for a, b in zip(rope(q, k), hf_rotary(q, k)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="even"):
        fnn.RotaryEmbedding(7)
    with pytest.raises(ValueError, match="even"):
        ops.apply_rotary(torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 5))
    with pytest.raises(ValueError, match="4-D"):
        ops.apply_rotary(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="positions"):
        ops.apply_rotary(q, k, torch.arange(4))


def test_rotary_opcheck():
    q, k = torch.randn(2, 3, 7, 8, requires_grad=True), torch.randn(2, 1, 7, 8, requires_grad=True)
    pos = torch.arange(7, dtype=torch.float32)[None]
    torch.library.opcheck(_rotary_op, (q, k, pos, rotary_inv_freq(8, 10000.0, "cpu"), False, False))
    torch.library.opcheck(_rotary_op, (q, k, pos, rotary_inv_freq(8, 10000.0, "cpu"), True, False))


def pe_reference(L, D, offset, dtype):
    """The PyTorch-tutorial table, in ``dtype`` math (float64 gives the reference)."""
    pos = torch.arange(offset, offset + L, dtype=dtype)[:, None]
    div = torch.exp(torch.arange(0, D, 2, dtype=dtype) * (-math.log(10000.0) / D))
    pe = torch.zeros(L, D, dtype=dtype)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: D // 2])
    return pe


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,offset", [((2, 42, 24), 0), ((3, 123, 13), 7), ((431, 6), 1000)])
def test_sinusoidal_triton_by_rule(shape, offset, dtype):
    L, D = shape[-2:]
    check_by_rule(lambda x: ops.add_sinusoidal_positions(x, offset, backend="triton"),
                  lambda x: x + pe_reference(L, D, offset, x.dtype), [torch.randn(shape)], dtype)


def test_sinusoidal_torch_path_and_module():
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(ops.add_sinusoidal_positions(x, 3), x + pe_reference(9, 16, 3, torch.float32))
    enc = fnn.SinusoidalPositionalEncoding(16, dropout=0.0, max_len=20)
    torch.testing.assert_close(enc(x, offset=3), x + pe_reference(9, 16, 3, torch.float32))
    assert len(enc.state_dict()) == 0
    with pytest.raises(ValueError, match="max_len"):
        enc(x, offset=15)
    with pytest.raises(ValueError, match="d_model"):
        enc(torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., L, d_model\)"):  # was a bare IndexError from shape[-2]
        enc(torch.randn(16))
    with pytest.raises(ValueError, match="offset"):
        ops.add_sinusoidal_positions(x, -1)


def test_sinusoidal_opcheck_and_compile():
    x = torch.randn(12, 10, requires_grad=True)
    torch.library.opcheck(_add_sinusoidal_op, (x, sinusoidal_inv_freq(10, "cpu"), 4, 2))
    torch._dynamo.reset()

    def fn(x):
        return ops.add_sinusoidal_positions(x * 2, 5, backend="triton")

    x3 = torch.randn(3, 4, 10, requires_grad=True)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x3)
    torch.testing.assert_close(out, fn(x3))
    out.sum().backward()
    torch.testing.assert_close(x3.grad, torch.full_like(x3, 2.0))


@pytest.mark.cuda
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_gpu_bf16_by_rule(interleaved):
    q, k = torch.randn(4, 32, 2048, 128, device="cuda"), torch.randn(4, 8, 2048, 128, device="cuda")
    pos = torch.arange(2048, device="cuda")
    check_by_rule(lambda q, k: ops.apply_rotary(q, k, pos, interleaved=interleaved, backend="triton"),
                  lambda q, k: hf_rotary(q, k, pos, interleaved=interleaved), [q, k], torch.bfloat16)


@pytest.mark.cuda
def test_sinusoidal_gpu_bf16_by_rule():
    x = torch.randn(8, 4096, 768, device="cuda")
    check_by_rule(lambda x: ops.add_sinusoidal_positions(x, 0, backend="triton"),
                  lambda x: x + pe_reference(4096, 768, 0, x.dtype).to(x.device), [x], torch.bfloat16)
