"""Every attention backend against the float64 reference, on the shared feature matrix."""

import pytest
import torch

from attention_cases import CASES, check_case, require_backend

# (backend, device, dtype) combinations that run here. Triton runs on CPU tensors
# under the interpreter (whose bf16 tl.dot is unreliable, so fp16/fp32 there);
# GPU combinations are marked and skipped without a GPU.
CPU_COMBOS = [
    ("reference", "cpu", torch.float32),
    ("reference", "cpu", torch.bfloat16),
    ("naive", "cpu", torch.float32),
    ("naive", "cpu", torch.bfloat16),
    ("cpu", "cpu", torch.float32),
    ("cpu", "cpu", torch.bfloat16),
    ("triton", "cpu", torch.float32),
    ("triton", "cpu", torch.float16),
]
GPU_COMBOS = [
    ("reference", "cuda", torch.bfloat16),
    ("naive", "cuda", torch.float16),
    ("triton", "cuda", torch.bfloat16),
    ("triton", "cuda", torch.float16),
    ("triton", "cuda", torch.float32),
    ("cuda", "cuda", torch.bfloat16),
    ("cuda", "cuda", torch.float16),
]


def _params(combos, marks=()):
    return [
        pytest.param(b, d, t, id=f"{b}-{d}-{str(t).split('.')[-1]}", marks=marks) for b, d, t in combos
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend,device,dtype", _params(CPU_COMBOS) + _params(GPU_COMBOS, pytest.mark.cuda))
def test_backend_matches_reference(backend, device, dtype, case):
    require_backend(backend)
    check_case(case, backend, dtype, device)


@pytest.mark.parametrize("case", [c for c in CASES if c.mask == "float"], ids=lambda c: c.id)
def test_reference_float_mask_gradient(case):
    check_case(case, "reference", torch.float32, "cpu", mask_grad=True)
