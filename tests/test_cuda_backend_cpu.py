"""The "cuda" backend's Python side on a machine without its kernels: it registers,
stays out of "auto" until validated on a GPU, explains why it is unavailable, and
its head-dim padding rule is right."""

import pytest
import torch

import fastformer
from fastformer.ops import softmax_cuda
from fastformer.ops.attention import cuda as attention_cuda


def test_registered_but_not_auto_until_validated_on_gpu():
    info = fastformer.backends()["cuda"]
    assert info["auto"] is attention_cuda.CUDA_VALIDATED_ON_GPU
    assert attention_cuda.CUDA_VALIDATED_ON_GPU is False  # flipped only by a commit recording a passing GPU run
    if not torch.cuda.is_available():
        assert not info["available"] and info["reason"]


@pytest.mark.parametrize("E,Ev,d", [(64, 64, 64), (128, 128, 128), (16, 16, 64), (40, 8, 64), (65, 64, 128),
                                    (32, 96, 128), (129, 64, None), (64, 256, None)])
def test_kernel_head_dim_padding(E, Ev, d):
    assert attention_cuda.kernel_head_dim(E, Ev) == d


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_clear_errors_without_gpu():
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="cuda"):
        fastformer.attention(q, q, q, backend="cuda")
    assert fastformer.attention(q, q, q).shape == q.shape  # auto still works
    with pytest.raises(RuntimeError, match="softmax_cuda"):
        softmax_cuda.softmax_cuda_forward(q, None, 1.0, False)
