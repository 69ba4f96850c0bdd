"""Every attention backend against the float64 reference, on the shared feature matrix."""

import pytest
import torch

from attention_cases import CASES, check_case, require_backend

from fastformer.ops.attention.triton import padded_tiles_unsupported

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
    if backend == "triton" and padded_tiles_unsupported(case.E, case.Ev or case.E, torch.device(device)):
        # A head-dim pair that faults in triton 3.6's sm_90 code: refused by name, never launched,
        # and "auto" takes it elsewhere.
        with pytest.raises(ValueError, match="pad to different tiles"):
            check_case(case, backend, dtype, device)
        check_case(case, "auto", dtype, device)
        return
    check_case(case, backend, dtype, device)


def test_triton_refuses_only_the_head_dims_that_faulted_on_sm90():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert padded_tiles_unsupported(24, 8, cuda)  # faulted on an H200 (GPU run 2)
    for e, ev in ((16, 16), (16, 8), (24, 24), (24, 16), (32, 8), (40, 40), (5, 7), (80, 80), (8, 8), (64, 128)):
        assert padded_tiles_unsupported(e, ev, cuda) is None, (e, ev)  # ran correctly there
    assert padded_tiles_unsupported(24, 8, cpu) is None  # the interpreter is fine


@pytest.mark.parametrize("case", [c for c in CASES if c.mask == "float"], ids=lambda c: c.id)
def test_reference_float_mask_gradient(case):
    check_case(case, "reference", torch.float32, "cpu", mask_grad=True)
