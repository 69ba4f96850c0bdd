"""The correctness rule itself: it must fail wrong answers, not just pass right ones."""

import pytest
import torch

from error_rule import assert_close_by_rule


def _case():
    ref = torch.randn(64, 64, dtype=torch.float64)
    same = ref.to(torch.float16)  # PyTorch-in-fp16 stand-in: rounding error only
    return ref, same


def test_rounding_passes():
    ref, same = _case()
    assert_close_by_rule(same.clone(), ref, same)


def test_one_wrong_element_fails():
    ref, same = _case()
    bad = same.clone()
    bad[3, 5] += 0.25
    with pytest.raises(AssertionError, match="exceeds 2"):
        assert_close_by_rule(bad, ref, same)


def test_unwritten_nan_fails():
    ref, same = _case()
    bad = same.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_by_rule(bad, ref, same)


def test_shape_mismatch_fails():
    ref, same = _case()
    with pytest.raises(AssertionError, match="shape"):
        assert_close_by_rule(same[:, :10], ref, same)


def test_poisoned_outputs_are_nan(monkeypatch):
    from fastformer.ops.buffers import new_output

    monkeypatch.setenv("FASTFORMER_POISON_OUTPUTS", "1")
    assert torch.isnan(new_output((3, 4), torch.float32, "cpu")).all()
