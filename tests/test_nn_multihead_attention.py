"""fastformer.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""

import pytest
import torch
from torch import nn

import fastformer.nn as ffnn
from nn_parity import check_parity, random_mask, single_thread

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

E, H, B, L, S = 16, 4, 3, 5, 7

CONFIGS = {
    "default": {},
    "batch_first": dict(batch_first=True),
    "kdim_vdim": dict(kdim=12, vdim=10),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "no_bias": dict(bias=False),
    "all_extras": dict(add_bias_kv=True, add_zero_attn=True, batch_first=True, kdim=12, vdim=10),
}

MASKS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "attn2d_bool",
    "attn2d_float",
    "attn3d_bool",
    "attn3d_float",
    "both_bool",
    "both_float",
    "causal",
    "causal_kpm",
]

WEIGHTS = {"no_weights": dict(need_weights=False), "avg": dict(need_weights=True), "per_head": dict(need_weights=True, average_attn_weights=False)}


def make_pair(cfg, dtype=torch.float32, device="cpu"):
    t = nn.MultiheadAttention(E, H, **cfg, device=device, dtype=dtype)
    if t.in_proj_bias is not None:  # non-zero biases so bias handling is exercised
        with torch.no_grad():
            t.in_proj_bias.normal_()
            t.out_proj.bias.normal_()
    return t, ffnn.MultiheadAttention(E, H, **cfg, device=device, dtype=dtype)


def make_inputs(cfg, batched=True, device="cpu"):
    kdim, vdim = cfg.get("kdim", E), cfg.get("vdim", E)

    def x(n, d):
        if not batched:
            shape = (n, d)
        else:
            shape = (B, n, d) if cfg.get("batch_first") else (n, B, d)
        return torch.randn(shape, device=device, requires_grad=True)

    return x(L, E), x(S, kdim), x(S, vdim)


def mask_kwargs(kind: str, batched=True, device="cpu"):
    kpm_shape = (B, S) if batched else (S,)
    am3_shape = (B * H, L, S) if batched else (H, L, S)
    out = {}
    if kind.startswith("kpm") or kind.startswith("both") or kind == "causal_kpm":
        out["key_padding_mask"] = random_mask(kpm_shape, "float" if kind.endswith("float") else "bool")
    if kind.startswith("attn2d") or kind.startswith("both"):
        out["attn_mask"] = random_mask((L, S), "float" if kind.endswith("float") else "bool")
    if kind.startswith("attn3d"):
        out["attn_mask"] = random_mask(am3_shape, "float" if kind.endswith("float") else "bool")
    if kind.startswith("causal"):
        out["attn_mask"] = torch.triu(torch.full((L, S), float("-inf")), diagonal=1)
        out["is_causal"] = True
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_parity_train_fp32(cfg, masks, weights):
    t, ours = make_pair(CONFIGS[cfg])
    kw = {**mask_kwargs(masks), **WEIGHTS[weights]}
    check_parity(t, ours, make_inputs(CONFIGS[cfg]), kw, train=True)


@pytest.mark.parametrize("masks", ["none", "both_bool", "attn3d_float", "causal"])
@pytest.mark.parametrize("cfg", ["default", "batch_first", "all_extras"])
def test_parity_eval_fp32(cfg, masks):
    t, ours = make_pair(CONFIGS[cfg])
    check_parity(t, ours, make_inputs(CONFIGS[cfg]), mask_kwargs(masks), train=False)
    check_parity(t, ours, make_inputs(CONFIGS[cfg]), {**mask_kwargs(masks), "need_weights": False}, train=False, grad=False)


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "attn2d_float", "attn3d_bool", "both_float"])
@pytest.mark.parametrize("cfg", ["default", "all_extras"])
def test_parity_unbatched(cfg, masks, weights):
    t, ours = make_pair(CONFIGS[cfg])
    check_parity(t, ours, make_inputs(CONFIGS[cfg], batched=False), {**mask_kwargs(masks, batched=False), **WEIGHTS[weights]})


class SelfAttention(nn.Module):
    """Passes one tensor as query, key and value (the packed-projection path and torch's fast path)."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x, **kw):
        return self.mha(x, x, x, **kw)


@pytest.mark.parametrize("masks", ["none", "kpm_bool", "both_bool"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention(batch_first, train, masks):
    t, ours = make_pair(dict(batch_first=batch_first))
    x = torch.randn((B, S, E) if batch_first else (S, B, E), requires_grad=True)
    kw = {k: v for k, v in mask_kwargs(masks).items()}
    if "attn_mask" in kw:
        kw["attn_mask"] = random_mask((S, S), "bool")
    check_parity(SelfAttention(t), SelfAttention(ours), [x], kw, train=train)
    # eval + no grad + need_weights=False: torch takes its native fast path
    check_parity(SelfAttention(t), SelfAttention(ours), [x], {**kw, "need_weights": False}, train=False, grad=False)


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_need_weights_under_autocast_keeps_bfloat16(which):
    """pytorch#99012: under CPU autocast (bfloat16) a float32 mask must not promote the returned
    attention weights to float32: torch adds it inside baddbmm, in the scores' dtype."""
    torch.manual_seed(0)
    t = nn.MultiheadAttention(16, 2)
    ours = ffnn.MultiheadAttention(16, 2)
    ours.load_state_dict(t.state_dict())
    q, k = torch.randn(5, 1, 16), torch.randn(6, 1, 16)
    if which == "attn_mask":
        kw = {"attn_mask": torch.zeros(5, 6).index_fill_(1, torch.tensor([0]), -1.0)}
    else:
        kw = {"key_padding_mask": torch.zeros(1, 6).index_fill_(1, torch.tensor([1]), float("-inf"))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, w_t = t(q, k, k, **kw)
        out_f, w_f = ours(q, k, k, **kw)
    assert w_f.dtype == w_t.dtype == torch.bfloat16 and out_f.dtype == out_t.dtype
    torch.testing.assert_close(w_f.float(), w_t.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out_f.float(), out_t.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("need_weights", [False, True])
def test_nan_key_under_a_bool_mask_is_torchs(need_weights):
    """pytorch#101967's class through MHA: torch adds bool masks as a -inf bias, so a NaN key under
    key_padding_mask still turns the output (and the returned weights) NaN; ours must too."""
    torch.manual_seed(0)
    t = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours = ffnn.MultiheadAttention(8, 2, batch_first=True).eval()
    ours.load_state_dict(t.state_dict())
    x = torch.randn(2, 5, 8)
    kv = x.clone()
    kv[0, 4] = float("nan")
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 4] = True
    out_t, w_t = t(x, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    out_f, w_f = ours(x, kv, kv, key_padding_mask=kpm, need_weights=need_weights)
    assert torch.equal(out_f.isnan(), out_t.isnan())
    if need_weights:
        assert torch.equal(w_f.isnan(), w_t.isnan())
    torch.testing.assert_close(out_f[1], out_t[1], atol=1e-5, rtol=1e-5)


def test_key_is_value():
    t, ours = make_pair({})
    q, kv = torch.randn(L, B, E), torch.randn(S, B, E)
    ours.load_state_dict(t.state_dict())
    expected = t(q, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, kv, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)


def test_mismatched_mask_types_warn_like_torch():
    t, ours = make_pair({})
    q, k, v = make_inputs({})
    kw = dict(key_padding_mask=random_mask((B, S), "bool"), attn_mask=random_mask((L, S), "float"))
    with pytest.warns(UserWarning, match="mismatched"):
        ours(q, k, v, **kw)
    check_parity(t, ours, [q, k, v], kw)


@pytest.mark.parametrize("cfg", ["default", "kdim_vdim", "bias_kv", "no_bias"])
def test_state_dict_round_trip(cfg):
    t, ours = make_pair(CONFIGS[cfg])
    assert list(t.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(t.state_dict())  # strict
    back = nn.MultiheadAttention(E, H, **CONFIGS[cfg])
    back.load_state_dict(ours.state_dict())  # strict
    for (n1, p1), (n2, p2) in zip(t.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_dropout_applies_in_training_only():
    ours = ffnn.MultiheadAttention(E, H, dropout=0.5)
    q, k, v = (t.detach() for t in make_inputs({}))
    ours.eval()
    a, _ = ours(q, k, v, need_weights=False)
    b, _ = ours(q, k, v, need_weights=False)
    assert torch.equal(a, b)
    ours.train()
    c, w = ours(q, k, v, need_weights=True)
    assert not torch.allclose(a, c)
    # returned weights are the dropped-out ones the output was computed from (as torch)
    assert (w == 0).any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        ffnn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="greater than 0"):
        ffnn.MultiheadAttention(0, 2)
    mha = ffnn.MultiheadAttention(E, H)
    q, k, v = (t.detach() for t in make_inputs({}))
    with pytest.raises(ValueError, match="unbatched 2D or batched 3D"):
        mha(q[None], k[None], v[None])
    with pytest.raises(ValueError, match="3-D"):
        mha(q, k[0], v)
    with pytest.raises(RuntimeError, match="shape of the 2D attn_mask"):
        mha(q, k, v, attn_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="shape of the 3D attn_mask"):
        mha(q, k, v, attn_mask=torch.zeros(B, L, S, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool and floating"):
        mha(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="embedding dimension"):
        mha(q[..., :8], k, v)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(q, k, v, key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool))


@pytest.mark.cuda
@pytest.mark.parametrize("masks", ["none", "both_bool", "attn3d_float", "causal"])
@pytest.mark.parametrize("weights", ["no_weights", "per_head"])
@pytest.mark.parametrize("cfg", ["default", "batch_first", "all_extras"])
def test_parity_bf16_cuda(cfg, masks, weights):
    t, ours = make_pair(CONFIGS[cfg], device="cuda")
    kw = {**mask_kwargs(masks, device="cuda"), **WEIGHTS[weights]}
    check_parity(t, ours, make_inputs(CONFIGS[cfg], device="cuda"), kw, dtype=torch.bfloat16)


def test_embed_dim_not_divisible_is_torchs_assertion_error():
    """torch asserts embed_dim % num_heads == 0 (AssertionError), here and in the transformer
    layers that build one: ``except AssertionError`` must catch ours too (it was a plain
    ValueError; found by a newcomer trial)."""
    import fastformer.nn as fnn

    for build in (lambda: fnn.MultiheadAttention(65, 4), lambda: fnn.TransformerEncoderLayer(65, 4),
                  lambda: fnn.TransformerDecoderLayer(65, 4)):
        with pytest.raises(AssertionError, match="divisible by num_heads"):
            build()
        with pytest.raises(ValueError, match="divisible by num_heads"):
            build()
