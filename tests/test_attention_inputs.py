"""Bad input to scaled_dot_product_attention raises a clear error naming the argument."""

import pytest
import torch

import fastformer

sdpa = fastformer.scaled_dot_product_attention


def qkv(B=2, H=2, L=5, S=7, E=8, Ev=8, dtype=torch.float32, hkv=None):
    return (
        torch.randn(B, H, L, E, dtype=dtype),
        torch.randn(B, hkv or H, S, E, dtype=dtype),
        torch.randn(B, hkv or H, S, Ev, dtype=dtype),
    )


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_rank_mismatch_broadcasts_as_torch(backend):
    q, k, v = qkv()
    out = sdpa(q, k[0], v, backend=backend)  # key (H, S, E) serves every batch, as in torch
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k[0], v))


@pytest.mark.parametrize("backend", ["reference", "naive"])
def test_rank_mismatch_not_broadcastable(backend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="broadcastable"):
        sdpa(q, torch.randn(3, 7, 8), v, backend=backend)


def test_rank_too_small():
    with pytest.raises(ValueError, match="at least 2 dimensional"):
        sdpa(torch.randn(4), torch.randn(4, 4), torch.randn(4, 4))


def test_head_count_mismatch_without_gqa():
    q, k, v = qkv(H=4, hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k, v)


def test_gqa_heads_not_divisible():
    q, k, v = qkv(H=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        sdpa(q, k, v, enable_gqa=True)


def test_head_dim_mismatch():
    q, _, v = qkv()
    k = torch.randn(2, 2, 7, 6)
    with pytest.raises(ValueError, match="key's last dimension"):
        sdpa(q, k, v)


def test_key_value_length_mismatch():
    q, k, _ = qkv()
    v = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="same sequence length"):
        sdpa(q, k, v)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch and head dimensions"):
        sdpa(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]))


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 5, 7), (3, 1, 1, 7)])
def test_mask_not_broadcastable(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attn_mask of shape .* not broadcastable"):
        sdpa(q, k, v, attn_mask=torch.ones(shape, dtype=torch.bool))


def test_mask_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor, a float32 tensor or have query's dtype"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.int64))


def test_mask_wrong_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor"):
        sdpa(q, k, v, attn_mask=[[True]])


def test_dtype_mix():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="same dtype"):
        sdpa(q.half(), k, v)


def test_integer_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="query must be a floating-point tensor"):
        sdpa(q.long(), k.long(), v.long())


def test_non_tensor_input():
    _, k, v = qkv()
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        sdpa([1.0], k, v)


@pytest.mark.skipif(not hasattr(torch, "device"), reason="")
def test_device_mix():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="attn_mask must be on query's device"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta"))


def test_causal_with_mask():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Explicit attn_mask should not be set when is_causal=True"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_dropout(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        sdpa(q, k, v, dropout_p=p)


def test_bad_scale_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale must be a float"):
        sdpa(q, k, v, scale="0.1")


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        sdpa(q, k, v, backend="flash")


def test_forced_unavailable_backend_says_why(monkeypatch):
    from fastformer.ops.attention import registry as dispatch

    q, k, v = qkv()
    monkeypatch.setitem(dispatch._IMPORT_ERRORS, "cuda", "ImportError: built without CUDA")
    monkeypatch.delitem(dispatch._REGISTRY, "cuda", raising=False)
    with pytest.raises(RuntimeError, match="attention backend 'cuda' is not available: ImportError: built without CUDA"):
        sdpa(q, k, v, backend="cuda")


# Flags are exactly bools, as torch's argument parser demands: a truthy "False" must not run causal
# (found replaying invalid inputs against the drop-in).
@pytest.mark.parametrize("value", ["False", 1, 0, None, torch.tensor(True)], ids=["str", "one", "zero", "none", "tensor"])
def test_non_bool_flags_raise_naming_the_argument(value):
    q, k, v = qkv()
    qkv_packed = torch.randn(2, 5, 3, 4, 8)
    calls = {
        "is_causal": lambda: sdpa(q, q, q, is_causal=value),
        "enable_gqa": lambda: sdpa(q, k, v, enable_gqa=value),
        "causal_bottom_right": lambda: fastformer.attention(q, q, q, causal_bottom_right=value),
        "causal": lambda: fastformer.attention_qkvpacked(qkv_packed, causal=value),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"argument '{name}' must be bool"):
            call()
    with pytest.raises(TypeError, match="argument 'is_causal' must be bool"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=value)  # torch's own, for the record


def test_varlen_and_decode_causal_must_be_bool():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="argument 'causal' must be bool"):
        fastformer.varlen_attention(q, q, q, cu, cu, 4, 4, causal="yes")
    qd, cache = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(TypeError, match="argument 'causal' must be bool"):
        fastformer.decode_attention(qd, cache, cache, 3, causal=1)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_scale_and_dropout_as_numpy_or_0d_tensor(backend):
    """torch takes a NumPy float or a 0-d tensor for ``scale`` and ``dropout_p``: so do we."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    for scale in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):
        out = sdpa(q, k, v, scale=scale, dropout_p=torch.tensor(0.0), backend=backend)
        torch.testing.assert_close(out, expected)
