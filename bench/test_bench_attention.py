"""Attention micro-benchmarks for pytest-benchmark, grouped by shape so the
providers of bench/attention.py sit side by side:

    pytest bench --benchmark-only                         # this machine's device
    pytest bench --benchmark-only --benchmark-json=out.json
"""

import pytest
import torch

from attention import providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SHAPES = [(4, 16, 4096, 128), (16, 16, 1024, 64)] if DEVICE == "cuda" else [(1, 8, 512, 64), (1, 8, 1024, 64)]
PROVIDERS = providers(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}L{}d{}".format(*s))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_attention_forward(benchmark, provider, shape, causal):
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE) for _ in range(3))
    fn = PROVIDERS[provider]
    benchmark.group = f"attention fwd {'x'.join(map(str, shape))} {'causal' if causal else 'full'}"

    def step():
        with torch.no_grad():
            out = fn(q, k, v, causal)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(step)
