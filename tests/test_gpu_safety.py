"""GPU safety of the fused attention backends (run by bench/gpu.sh; skipped without a GPU):
non-default streams, CUDA graph capture, concurrent first calls from two threads,
no memory growth over 1000 calls, and a 128k-token sequence (64-bit offsets)."""

import threading

import pytest
import torch
import torch.nn.functional as F

import fastformer
from error_rule import assert_close_by_rule

pytestmark = pytest.mark.cuda
GPU_BACKENDS = ["triton", "cuda"]


def _need(backend):
    info = fastformer.backends()[backend]
    if not info["available"]:
        pytest.skip(f"{backend}: {info['reason']}")


def _qkv(B=2, H=4, L=300, S=300, E=64, dtype=torch.bfloat16, grad=False):
    return [torch.randn(B, H, n, E, device="cuda", dtype=dtype, requires_grad=grad) for n in (L, S, S)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    _need(backend)
    q, k, v = _qkv()
    expected = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    _need(backend)
    q, k, v = _qkv()
    fastformer.scaled_dot_product_attention(q, k, v, backend=backend)  # compile/autotune outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fastformer.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastformer.scaled_dot_product_attention(q, k, v, backend=backend)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = fastformer.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_two_threads_first_call(backend):
    _need(backend)
    shapes = [(1, 3, 777, 777, 80), (1, 3, 777, 777, 80)]  # an unusual shape: a fresh autotune/JIT key
    results, errors = [None, None], []

    def work(i):
        try:
            B, H, L, S, E = shapes[i]
            torch.manual_seed(i)
            q, k, v = _qkv(B, H, L, S, E)
            out = fastformer.scaled_dot_product_attention(q, k, v, backend=backend)
            results[i] = (q, k, v, out)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for q, k, v, out in results:
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert_close_by_rule(out, ref, F.scaled_dot_product_attention(q, k, v), name=f"{backend}/thread")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_memory_growth_over_1000_calls(backend):
    _need(backend)
    q, k, v = _qkv(grad=True)

    def step():
        out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
        out.backward(torch.ones_like(out))

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before, "device memory grew across repeated calls"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_128k_tokens(backend):
    _need(backend)
    L, E = 131072, 64
    q, k, v = _qkv(1, 2, L, L, E)
    out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rows = torch.tensor([0, 1, 4097, 65535, 65536, L - 2, L - 1], device="cuda")
    # float64 reference for a few query rows against every visible key
    qr = q[:, :, rows].double()
    s = qr @ k.double().transpose(-2, -1) * E**-0.5
    visible = torch.arange(L, device="cuda")[None, :] <= rows[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    ref = torch.softmax(s, -1) @ v.double()
    assert_close_by_rule(out[:, :, rows], ref, same[:, :, rows], name=f"{backend}/128k")
