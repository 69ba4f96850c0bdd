"""Dropout of the reference and naive backends (the fused backends reuse these checks)."""

import pytest
import torch

from dropout_checks import dropout_all, dropout_matches_explicit_mask, dropout_reproducible, dropout_statistics
from fastformer.ops.attention.naive import dropout_keep_mask


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_dropout_statistics(backend):
    dropout_statistics(backend, "cpu")


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_dropout_reproducible(backend):
    dropout_reproducible(backend, "cpu")


@pytest.mark.parametrize("is_causal", [False, True])
def test_naive_dropout_matches_explicit_mask(is_causal):
    dropout_matches_explicit_mask("naive", dropout_keep_mask, "cpu", is_causal=is_causal)


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_dropout_one_drops_everything(backend):
    dropout_all(backend, "cpu")


def test_zero_dropout_is_deterministic_and_equals_no_dropout():
    import fastformer

    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    a = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=0.0, backend="naive")
    b = fastformer.scaled_dot_product_attention(q, k, v, backend="naive")
    assert torch.equal(a, b)
