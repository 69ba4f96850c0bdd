"""fastformer.nn.Attention with the attention variants (sliding window, ALiBi, logit soft-cap):
the block against its math written out with the float64 explicit-mask reference
(tests/variant_reference.py), forward and every gradient, under the error rule; the KV-cache
decoding path against the full sequence; ALiBi's standard slopes; argument checks."""

import copy

import pytest
import torch

import fastformer.nn as ffnn
from error_rule import assert_close_by_rule
from nn_parity import single_thread
from variant_reference import reference_attention

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

DIM, HEADS = 32, 4


def explicit_block(m: ffnn.Attention, x, is_causal):
    """The block's forward with the attention written out (in x's dtype)."""
    B, N, _ = x.shape
    hd, kvh = m.head_dim, m.num_kv_heads
    qkv = torch.nn.functional.linear(x, m.qkv.weight.to(x.dtype), m.qkv.bias.to(x.dtype))
    q, k, v = qkv.split([HEADS * hd, kvh * hd, kvh * hd], dim=-1)
    q, k, v = (t.reshape(B, N, -1, hd).transpose(1, 2) for t in (q, k, v))
    out, _ = reference_attention(q, k, v, is_causal=is_causal, scale=m.scale, window=m.window_size,
                                 alibi_slopes=m.alibi_slopes, softcap=m.softcap)
    out = out.transpose(1, 2).reshape(B, N, HEADS * hd)
    return torch.nn.functional.linear(out, m.proj.weight.to(x.dtype), m.proj.bias.to(x.dtype))


VARIANTS = {
    "window": dict(window_size=(3, 0)),
    "window_two_sided": dict(window_size=(2, 1)),
    "alibi": dict(alibi=True),
    "softcap": dict(softcap=1.5),
    "all_gqa": dict(window_size=(4, 0), alibi=True, softcap=2.0, num_kv_heads=2),
}


@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_block_matches_explicit_float64_reference(variant, is_causal):
    torch.manual_seed(0)
    m = ffnn.Attention(DIM, HEADS, qkv_bias=True, **VARIANTS[variant])
    with torch.no_grad():  # scores large enough that the soft-cap bites
        m.qkv.weight.mul_(4.0)
    x = torch.randn(2, 13, DIM, requires_grad=True)
    ours = m(x, is_causal=is_causal)
    x64 = x.detach().double().requires_grad_()
    m64 = copy.deepcopy(m).double()
    ref = explicit_block(m64, x64, is_causal)
    x32 = x.detach().clone().requires_grad_()
    m32 = copy.deepcopy(m)
    same = explicit_block(m32, x32, is_causal)  # the same math in float32: "torch's own error"
    assert_close_by_rule(ours, ref, same)
    g = torch.randn_like(ours)
    ours.backward(g)
    ref.backward(g.double())
    same.backward(g)
    assert_close_by_rule(x.grad, x64.grad, x32.grad, name="grad x")
    for (name, p), p64, p32 in zip(m.named_parameters(), m64.parameters(), m32.parameters()):
        assert_close_by_rule(p.grad, p64.grad, p32.grad, name=f"grad {name}")


@pytest.mark.parametrize("variant", ["window", "alibi", "all_gqa"])
def test_kv_cache_decoding_matches_the_full_sequence(variant):
    """Prefill 5 tokens, then steps of 1, 3 and 1 through the decode op: the window and the
    ALiBi distances are bottom-right aligned, so each step sees what the full pass saw."""
    torch.manual_seed(0)
    kw = dict(VARIANTS[variant])
    m = ffnn.Attention(DIM, HEADS, qkv_bias=True, **kw).eval()
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        full = m(x, is_causal=True)
        cache = ffnn.KVCache(1, 2, m.num_kv_heads, 10, m.head_dim)
        parts = []
        for lo, hi in ((0, 5), (5, 6), (6, 9), (9, 10)):
            parts.append(m(x[:, lo:hi], is_causal=True, cache=cache))
            cache.advance(hi - lo)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_alibi_slopes_are_the_standard_ones():
    torch.testing.assert_close(ffnn.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head sequence 2^(-2h), then the odd terms 2^(-1), 2^(-3) of the 8-head one (BLOOM).
    torch.testing.assert_close(ffnn.alibi_slopes(6), torch.tensor([2.0 ** -e for e in (2, 4, 6, 8, 1, 3)]))
    torch.testing.assert_close(ffnn.alibi_slopes(1), torch.tensor([2.0 ** -8]))
    assert ffnn.alibi_slopes(12).dtype == torch.float32 and ffnn.alibi_slopes(12).shape == (12,)
    with pytest.raises(ValueError, match="num_heads"):
        ffnn.alibi_slopes(0)


def test_slopes_stay_float32_and_follow_the_device():
    m = ffnn.Attention(DIM, HEADS, alibi=True).to(torch.float64)
    assert m.alibi_slopes.dtype == torch.float32
    assert "alibi_slopes" not in m.state_dict()  # fixed, not learned: checkpoints are unchanged
    x = torch.randn(1, 5, DIM, dtype=torch.float64)
    assert m(x, is_causal=True).dtype == torch.float64
    own = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    m2 = ffnn.Attention(DIM, HEADS, alibi_slopes=own)
    assert m2.alibi_slopes.dtype == torch.float32 and torch.equal(m2.alibi_slopes, own.float())


def test_plain_block_calls_the_packed_op_without_variants(monkeypatch):
    """No variant: self-attention runs attention_qkvpacked with no variant arguments (the variant
    path, ops.attention, is not called); with a mask it is the SDPA drop-in."""
    import fastformer.ops as ops

    calls = []
    for name in ("attention_qkvpacked", "scaled_dot_product_attention", "attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: calls.append((_n, sorted(k))) or _r(*a, **k))
    ffnn.Attention(DIM, HEADS)(torch.randn(1, 3, DIM))
    assert calls == [("attention_qkvpacked", ["causal", "softmax_scale"])]
    calls.clear()
    ffnn.Attention(DIM, HEADS)(torch.randn(1, 3, DIM), torch.ones(3, 3, dtype=torch.bool))
    assert [c[0] for c in calls] == ["scaled_dot_product_attention"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_size"):
        ffnn.Attention(DIM, HEADS, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_size"):
        ffnn.Attention(DIM, HEADS, window_size=3)
    with pytest.raises(ValueError, match="softcap"):
        ffnn.Attention(DIM, HEADS, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ffnn.Attention(DIM, HEADS, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match="not both"):
        ffnn.Attention(DIM, HEADS, alibi=True, alibi_slopes=torch.ones(HEADS))
    with pytest.raises(TypeError, match="alibi_slopes"):
        ffnn.Attention(DIM, HEADS, alibi_slopes=[1.0] * HEADS)


def test_attn_mask_on_a_decoding_step_is_refused():
    """A decoding step runs decode_attention, which takes no mask: an attn_mask there (say a
    padding mask for batched generation) was silently ignored; it now raises, naming it. The
    prefill still takes one."""
    m = ffnn.Attention(DIM, HEADS).eval()
    x = torch.randn(2, 6, DIM)
    cache = ffnn.KVCache(1, 2, m.num_kv_heads, 10, m.head_dim)
    with torch.no_grad():
        m(x[:, :5], attn_mask=torch.ones(5, 5, dtype=torch.bool).tril(), cache=cache)
        cache.advance(5)
        with pytest.raises(ValueError, match="attn_mask"):
            m(x[:, 5:], attn_mask=torch.ones(1, 6, dtype=torch.bool), cache=cache)
        m(x[:, 5:], is_causal=True, cache=cache)  # without one, the step runs
