"""Drop-in parity beyond numerics (issue 22): what code written against torch relies on.

Each check runs the same call on torch's module/function and on fastformer's and
compares behaviour, not only values, over every drop-in:

* exception types: ours is an instance of torch's type (``AssertionError`` /
  ``RuntimeError``) *and* of the Pythonic one (``ValueError`` / ``TypeError``);
* dtype mixes torch accepts (a half ``in_proj_bias`` in a float64 module);
* ``torch.nn.attention.bias.CausalBias`` as ``attn_mask``, never materialised;
* the ``is_causal`` hint with a mask torch ignores;
* dropout gated by each ``Dropout`` submodule, as torch's layers do;
* torch's warnings (``enable_nested_tensor`` that cannot be used).

TorchScript and ``torch.export`` live in ``test_script_export.py``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import fastformer
from fastformer import nn as fnn
from fastformer.ops.errors import (
    AttentionDtypeError,
    AttentionInputError,
    MultiheadAttentionDtypeError,
    MultiheadAttentionShapeError,
)


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to look at whatever was raised
        return exc
    return None


def assert_torch_and_pythonic(ours_fn, torch_fn, pythonic):
    """Both raise; ours is an instance of torch's exception type and of ``pythonic``."""
    theirs = _raised(torch_fn)
    assert theirs is not None, "the case must be an error in torch too"
    ours = _raised(ours_fn)
    assert ours is not None, f"fastformer accepted what torch rejects with {type(theirs).__name__}: {theirs}"
    assert isinstance(ours, type(theirs)), f"torch raises {type(theirs).__name__}, ours {type(ours).__mro__}: {ours}"
    if pythonic is not None:
        assert isinstance(ours, pythonic), f"expected a {pythonic.__name__} too, got {type(ours).__mro__}"
    return ours, theirs


# ----------------------------------------------------------------------------- exception types: SDPA


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


SDPA_ERRORS = {
    # case: (args, kwargs, Pythonic type)
    "1-D query": ((_r(4), _r(4), _r(4)), {}, ValueError),
    "float32 query, float16 key/value": ((_r(1, 1, 3, 4), _r(1, 1, 3, 4).half(), _r(1, 1, 3, 4).half()), {}, TypeError),
    "integer query": ((torch.ones(1, 1, 3, 4, dtype=torch.int32),) * 3, {}, TypeError),
    "mask not broadcastable": ((_r(1, 1, 3, 4), _r(1, 1, 3, 4), _r(1, 1, 3, 4)), {"attn_mask": torch.zeros(5, 5)}, ValueError),
    "integer mask": ((_r(1, 1, 3, 4),) * 3, {"attn_mask": torch.zeros(3, 3, dtype=torch.int32)}, TypeError),
    "dropout_p > 1": ((_r(1, 1, 3, 4),) * 3, {"dropout_p": 1.5}, ValueError),
    "heads differ without enable_gqa": ((_r(1, 4, 3, 4), _r(1, 2, 3, 4), _r(1, 2, 3, 4)), {}, ValueError),
    "batch differs": ((_r(2, 1, 3, 4), _r(3, 1, 3, 4), _r(3, 1, 3, 4)), {}, ValueError),
    "head dim differs": ((_r(1, 1, 3, 4), _r(1, 1, 3, 5), _r(1, 1, 3, 4)), {}, ValueError),
}


@pytest.mark.parametrize("case", sorted(SDPA_ERRORS))
def test_sdpa_error_types(case):
    args, kwargs, pythonic = SDPA_ERRORS[case]
    assert_torch_and_pythonic(
        lambda: fastformer.scaled_dot_product_attention(*args, **kwargs),
        lambda: F.scaled_dot_product_attention(*args, **kwargs),
        pythonic,
    )


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_mask_with_is_causal_is_torch_math_error(mask_dtype):
    q = _r(1, 1, 3, 4)
    mask = torch.ones(3, 3, dtype=mask_dtype)
    with sdpa_kernel(SDPBackend.MATH):  # the backend whose rule we follow (torch's fused CPU one combines them)
        ours, theirs = assert_torch_and_pythonic(
            lambda: fastformer.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True),
            lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True),
            ValueError,
        )
    assert "Explicit attn_mask should not be set when is_causal=True" in str(ours)


def test_sdpa_messages_use_torch_wording():
    with pytest.raises(RuntimeError, match="Expected query, key, and value to have the same dtype"):
        fastformer.scaled_dot_product_attention(_r(1, 3, 4), _r(1, 3, 4).half(), _r(1, 3, 4).half())
    with pytest.raises(RuntimeError, match="at least 2 dimensional"):
        fastformer.scaled_dot_product_attention(_r(4), _r(4), _r(4))
    with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1"):
        fastformer.scaled_dot_product_attention(_r(1, 3, 4), _r(1, 3, 4), _r(1, 3, 4), dropout_p=-0.5)


def test_error_classes_are_both_types():
    for cls, bases in (
        (AttentionInputError, (ValueError, RuntimeError)),
        (AttentionDtypeError, (TypeError, RuntimeError)),
        (MultiheadAttentionShapeError, (ValueError, AssertionError)),
        (MultiheadAttentionDtypeError, (TypeError, AssertionError)),
    ):
        err = cls("x")
        assert all(isinstance(err, b) for b in bases)


# ----------------------------------------------------------------------------- exception types: modules

E, H = 4, 2


def _mha_pair(**kwargs):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    ours = fnn.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


q3, q2 = _r(3, 2, E), _r(3, E)
MHA_ERRORS = {
    # case: (call(module), Pythonic type or None where torch's type is the whole story)
    "3-D query, 2-D key": (lambda m: m(q3, q2, q2), ValueError),
    "4-D query": (lambda m: m(q3[None], q3[None], q3[None]), ValueError),
    "2-D query, (5, 4, 4) mask": (lambda m: m(q2, q2, q2, attn_mask=torch.zeros(5, 4, 4)), ValueError),
    "2-D query, 3-D mask with wrong L": (lambda m: m(q2, q2, q2, attn_mask=torch.zeros(H, 4, 4)), ValueError),
    "3-D key padding mask": (lambda m: m(q3, q3, q3, key_padding_mask=torch.zeros(2, 3, 3, dtype=torch.bool)), ValueError),
    "4-D attn_mask": (lambda m: m(q3, q3, q3, attn_mask=torch.zeros(1, 1, 3, 3)), ValueError),
    "2-D attn_mask of the wrong shape": (lambda m: m(q3, q3, q3, attn_mask=torch.zeros(2, 2)), ValueError),
    "3-D attn_mask of the wrong shape": (lambda m: m(q3, q3, q3, attn_mask=torch.zeros(3, 3, 3)), ValueError),
    "embedding dim": (lambda m: m(_r(3, 2, E + 1), _r(3, 2, E + 1), _r(3, 2, E + 1)), ValueError),
    "integer attn_mask": (lambda m: m(q3, q3, q3, attn_mask=torch.zeros(3, 3, dtype=torch.int32)), TypeError),
    "key and value shapes differ": (lambda m: m(q3, q3, _r(4, 2, E)), ValueError),
    "is_causal without a mask": (lambda m: m(q3, q3, q3, is_causal=True), None),
}


@pytest.mark.parametrize("case", sorted(MHA_ERRORS))
def test_multihead_attention_error_types(case):
    call, pythonic = MHA_ERRORS[case]
    ours, theirs = _mha_pair()
    assert_torch_and_pythonic(lambda: call(ours), lambda: call(theirs), pythonic)


def test_multihead_attention_mask_shape_messages_are_torchs():
    ours, theirs = _mha_pair()
    with pytest.raises(AssertionError) as got:
        ours(q2, q2, q2, attn_mask=torch.zeros(5, 4, 4))
    with pytest.raises(AssertionError) as want:
        theirs(q2, q2, q2, attn_mask=torch.zeros(5, 4, 4))
    assert str(got.value) == str(want.value)
    x = _r(3, 2, E)
    with pytest.raises(RuntimeError) as got:
        ours(x, x, x, attn_mask=torch.zeros(2, 2))
    with pytest.raises(RuntimeError) as want:
        theirs(x, x, x, attn_mask=torch.zeros(2, 2))
    assert str(got.value) == str(want.value)


_KW = dict(d_model=E, nhead=H, dim_feedforward=8, dropout=0.0)
_LAYER_PAIRS = {
    "TransformerEncoderLayer": lambda: (fnn.TransformerEncoderLayer(**_KW), nn.TransformerEncoderLayer(**_KW)),
    "TransformerDecoderLayer": lambda: (fnn.TransformerDecoderLayer(**_KW), nn.TransformerDecoderLayer(**_KW)),
    "TransformerEncoder": lambda: (
        fnn.TransformerEncoder(fnn.TransformerEncoderLayer(**_KW), 2, enable_nested_tensor=False),
        nn.TransformerEncoder(nn.TransformerEncoderLayer(**_KW), 2, enable_nested_tensor=False),
    ),
    "TransformerDecoder": lambda: (
        fnn.TransformerDecoder(fnn.TransformerDecoderLayer(**_KW), 2),
        nn.TransformerDecoder(nn.TransformerDecoderLayer(**_KW), 2),
    ),
    "Transformer": lambda: (fnn.Transformer(E, H, 1, 1, 8, dropout=0.0), nn.Transformer(E, H, 1, 1, 8, dropout=0.0)),
}


def _layer_pair(name):
    """(ours, torch's) with the same weights."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Transformer's seq-first encoder: both warn alike (tested below)
        ours, theirs = _LAYER_PAIRS[name]()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _layer_call(name, module, mask):
    x = _r(3, 2, E)
    if name in ("TransformerEncoderLayer",):
        return module(x, src_mask=mask)
    if name == "TransformerEncoder":
        return module(x, mask=mask)
    if name == "Transformer":
        return module(x, x, src_mask=mask)
    return module(x, x, tgt_mask=mask)


@pytest.mark.parametrize("name", sorted(_LAYER_PAIRS))
@pytest.mark.parametrize(
    "mask,pythonic",
    [(torch.zeros(5, 5), ValueError), (torch.zeros(3, 3, dtype=torch.int32), TypeError), (torch.zeros(1, 1, 3, 3), ValueError)],
    ids=["wrong-shape", "integer", "4-D"],
)
def test_layer_error_types(name, mask, pythonic):
    ours, theirs = _layer_pair(name)
    if name == "TransformerDecoder" and mask.dtype == torch.int32:
        # torch's decoder stack fails by accident here (RuntimeError: -inf overflows int while it
        # builds a causal mask to compare against); its layers assert the dtype, as ours do.
        with pytest.raises(TypeError, match="only bool and floating types of tgt_mask"):
            _layer_call(name, ours, mask)
        return
    assert_torch_and_pythonic(lambda: _layer_call(name, ours, mask), lambda: _layer_call(name, theirs, mask), pythonic)


def test_norm_error_types():
    for ours, theirs in ((fnn.LayerNorm(E), nn.LayerNorm(E)), (fnn.RMSNorm(E), nn.RMSNorm(E))):
        x = _r(3, E + 1)
        theirs_exc = _raised(lambda: theirs(x))
        ours_exc = _raised(lambda: ours(x))
        assert theirs_exc is not None and isinstance(ours_exc, type(theirs_exc))


# ----------------------------------------------------------------------------- dtype mixes


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "kdim"])
def test_in_proj_bias_in_another_dtype(need_weights, training, kind):
    """torch's module takes a half ``in_proj_bias`` in a float64 module and returns float64."""
    extra = {"kdim": 3, "vdim": 3} if kind == "kdim" else {}
    ours, theirs = _mha_pair(batch_first=True, dtype=torch.float64, **extra)
    for m in (ours, theirs):
        m.in_proj_bias.data = m.in_proj_bias.data.half()
        m.train(training)
    x = torch.randn(2, 3, E, dtype=torch.float64)
    kv = x if kind == "self" else torch.randn(2, 5, extra.get("kdim", E), dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x, kv, kv, need_weights=need_weights)
        got = ours(x, kv, kv, need_weights=need_weights)
    assert got[0].dtype == want[0].dtype == torch.float64
    torch.testing.assert_close(got[0], want[0])
    if need_weights:
        assert got[1].dtype == torch.float64
        torch.testing.assert_close(got[1], want[1])


# ----------------------------------------------------------------------------- CausalBias


@pytest.fixture
def no_materialize(monkeypatch):
    """Fail if anything builds the (L, S) mask of a CausalBias."""

    def boom(self, device=None):
        raise AssertionError("CausalBias was materialised")

    monkeypatch.setattr(CausalBias, "_materialize", boom)


@pytest.mark.parametrize("variant", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sdpa_causal_bias(variant, dtype):
    torch.manual_seed(0)
    q = torch.randn(1, 1, 23, 15, dtype=dtype)
    k, v = torch.randn(1, 1, 56, 15, dtype=dtype), torch.randn(1, 1, 56, 15, dtype=dtype)
    bias = variant(23, 56)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias)
    got = fastformer.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert got.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_causal_bias_is_never_materialised(no_materialize):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 3, 9, 8, requires_grad=True)
    for bias, bottom_right in ((causal_upper_left(5, 9), False), (causal_lower_right(5, 9), True)):
        got = fastformer.scaled_dot_product_attention(q, k, k, attn_mask=bias)
        want = fastformer.attention(q, k, k, is_causal=True, causal_bottom_right=bottom_right)
        torch.testing.assert_close(got, want)
        got.sum().backward()  # differentiable like the flag it maps to
        got_lse = fastformer.attention(q, k, k, attn_mask=bias, return_lse=True)[1]
        want_lse = fastformer.attention(q, k, k, is_causal=True, causal_bottom_right=bottom_right, return_lse=True)[1]
        torch.testing.assert_close(got_lse, want_lse)


def test_causal_bias_3d_and_gqa_match_torch():
    torch.manual_seed(0)
    q, k = torch.randn(4, 6, 8), torch.randn(4, 10, 8)
    for variant in (causal_upper_left, causal_lower_right):
        torch.testing.assert_close(
            fastformer.scaled_dot_product_attention(q, k, k, attn_mask=variant(6, 10)),
            F.scaled_dot_product_attention(q, k, k, attn_mask=variant(6, 10)),
        )
    q4, k4 = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8)
    torch.testing.assert_close(
        fastformer.scaled_dot_product_attention(q4, k4, k4, attn_mask=causal_lower_right(6, 10), enable_gqa=True),
        F.scaled_dot_product_attention(q4, k4, k4, attn_mask=causal_lower_right(6, 10), enable_gqa=True),
    )


def test_causal_bias_errors():
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        fastformer.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(5, 5), is_causal=True)
    with pytest.raises(ValueError, match="seq_len_q=4"):
        fastformer.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(4, 5))
    with pytest.raises(ValueError, match="causal_bottom_right"):
        fastformer.attention(q, q, q, attn_mask=causal_upper_left(5, 5), causal_bottom_right=True)


@pytest.mark.parametrize("variant", [causal_upper_left, causal_lower_right])
def test_multihead_attention_causal_bias(variant, no_materialize):
    """An extension (torch's module rejects a CausalBias): the fused path runs it as the causal flag."""
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(8, 2, batch_first=True)
    x, mem = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    got = mha(x, mem, mem, attn_mask=variant(5, 7), need_weights=False)[0]
    rows = torch.arange(5)[:, None] + (7 - 5 if variant is causal_lower_right else 0)
    masked = torch.arange(7)[None, :] > rows  # torch's True = not allowed
    want = mha(x, mem, mem, attn_mask=masked, need_weights=False)[0]
    torch.testing.assert_close(got, want)


def test_multihead_attention_causal_bias_with_weights_materialises():
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(8, 2)
    x = torch.randn(5, 2, 8)
    out, w = mha(x, x, x, attn_mask=causal_lower_right(5, 5))
    want, want_w = mha(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(5))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w, want_w)


def test_encoder_causal_bias_as_src_mask(no_materialize):
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = fnn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 6, 8)
    got = enc(x, mask=causal_upper_left(6, 6))
    want = enc(x, mask=nn.Transformer.generate_square_subsequent_mask(6), is_causal=True)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- is_causal hints


def test_mha_wrong_mask_with_is_causal_matches_torch_per_need_weights():
    """torch: with ``need_weights=False`` and no key padding mask, ``is_causal`` is the
    truth and the mask is neither used nor shape-checked; otherwise the mask is checked."""
    torch.manual_seed(0)
    ours, theirs = fnn.MultiheadAttention(4, 1), nn.MultiheadAttention(4, 1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 2, 4)
    for mask in (torch.zeros(2, 2), torch.zeros(7, 2, 2)):
        got = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
        want = theirs(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
        torch.testing.assert_close(got[0], want[0])
        assert got[1] is None and want[1] is None
        assert_torch_and_pythonic(
            lambda: ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=True),
            lambda: theirs(x, x, x, attn_mask=mask, is_causal=True, need_weights=True),
            ValueError,
        )
        kpm = torch.zeros(2, 1, dtype=torch.bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both warn about the mixed mask types
            assert_torch_and_pythonic(
                lambda: ours(x, x, x, attn_mask=mask, key_padding_mask=kpm, is_causal=True, need_weights=False),
                lambda: theirs(x, x, x, attn_mask=mask, key_padding_mask=kpm, is_causal=True, need_weights=False),
                ValueError,
            )


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_is_causal_flag_vs_mask_per_need_weights(need_weights):
    """A non-causal mask with ``is_causal=True``: causal wins without weights, the mask with them (torch)."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2)
    ours = fnn.MultiheadAttention(8, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 8)
    mask = torch.zeros(4, 4)
    torch.testing.assert_close(
        ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0],
        theirs(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0],
    )


# ----------------------------------------------------------------------------- dropout gating


def _dropouts(module):
    return [m for m in module.modules() if isinstance(m, (nn.Dropout, nn.MultiheadAttention, fnn.MultiheadAttention))]


LAYER_FACTORIES = {
    "TransformerEncoderLayer": lambda norm_first: fnn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, norm_first=norm_first),
    "TransformerDecoderLayer": lambda norm_first: fnn.TransformerDecoderLayer(8, 2, 16, dropout=0.5, norm_first=norm_first),
    "Transformer": lambda norm_first: fnn.Transformer(8, 2, 1, 1, 16, dropout=0.5, norm_first=norm_first),
}


def _run(name, module, x):
    return module(x) if name == "TransformerEncoderLayer" else module(x, x)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_dropout_follows_each_dropout_submodule(name, norm_first):
    torch.manual_seed(0)
    module = LAYER_FACTORIES[name](norm_first)
    x = torch.randn(5, 2, 8)
    module.eval()
    reference = _run(name, module, x)
    # The layer in training mode, every Dropout (and attention dropout) in eval: eval output (torch's rule).
    module.train()
    for m in _dropouts(module):
        m.eval()
    torch.testing.assert_close(_run(name, module, x), reference)
    # The layer in eval, one Dropout in training mode: that dropout applies.
    module.eval()
    for attr in ("dropout1", "dropout2", "dropout"):
        sub = [m for n, m in module.named_modules() if n.split(".")[-1] == attr]
        for m in module.modules():
            m.eval()
        for m in sub:
            m.train()
        assert not torch.allclose(_run(name, module, x), reference), f"{attr} in training mode applied no dropout"


def test_dropout_gating_does_not_read_the_layer_training_flag():
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(8, 2, 16, dropout=0.5).eval()
    x = torch.randn(5, 2, 8)
    want = layer(x)
    del layer.training  # torch's layer never reads it in forward; neither does ours
    torch.testing.assert_close(layer(x), want)


def test_dropout_replaced_by_another_module_is_called():
    layer = fnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()
    x = torch.randn(5, 2, 8)
    want = layer(x)
    layer.dropout1 = nn.Identity()
    torch.testing.assert_close(layer(x), want)
    calls = []
    layer.dropout2 = nn.Sequential()
    layer.dropout2.register_forward_hook(lambda *a: calls.append(1))
    layer(x)
    assert calls == [1]


# ----------------------------------------------------------------------------- warnings


ENCODER_LAYER_CONFIGS = {
    "bias=False": dict(bias=False, batch_first=True),
    "norm_first": dict(norm_first=True, batch_first=True),
    "not batch_first": dict(),
    "custom activation": dict(activation=torch.tanh, batch_first=True),
    "odd heads": dict(nhead=1, batch_first=True),
    "fine": dict(batch_first=True),
}


@pytest.mark.parametrize("config", sorted(ENCODER_LAYER_CONFIGS))
@pytest.mark.parametrize("enable_nested_tensor", [True, False])
def test_enable_nested_tensor_warning_is_torchs(config, enable_nested_tensor):
    kw = dict(d_model=8, nhead=2, dim_feedforward=16)
    kw.update(ENCODER_LAYER_CONFIGS[config])

    def messages(layer_cls, encoder_cls):
        layer = layer_cls(**kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enc = encoder_cls(layer, 2, enable_nested_tensor=enable_nested_tensor)
        return [str(w.message) for w in caught if w.category is UserWarning], enc.use_nested_tensor

    assert messages(fnn.TransformerEncoderLayer, fnn.TransformerEncoder) == messages(
        nn.TransformerEncoderLayer, nn.TransformerEncoder
    )


def test_padding_note_once_where_torch_would_nest(monkeypatch):
    from fastformer.nn import transformer

    monkeypatch.setattr(transformer, "_PADDING_NOTE_SHOWN", False)
    enc = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2).eval()
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[False, False, False, True], [False, False, False, False]])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        enc(x, src_key_padding_mask=pad)
        enc(x, src_key_padding_mask=pad)
    notes = [w for w in caught if "nested tensors" in str(w.message)]
    assert len(notes) == 1


# ----------------------------------------------------------------------------- dropout streams


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_dropout_matches_torch_in_statistics_not_bits(backend):
    """The fused kernels draw their own dropout masks (seeded from torch's generator): equal seeds
    give different samples than torch's, but the same expectation and spread. ``auto`` may hand a
    small CPU problem to torch's own kernel (the CPU policy table), whose stream is torch's."""
    if backend == "cpu" and not fastformer.backends()["cpu"]["available"]:
        pytest.skip(f"cpu backend unavailable: {fastformer.backends()['cpu']['reason']}")
    with fastformer.use_backend(backend):
        _check_dropout_statistics(fused=backend != "auto")


def _check_dropout_statistics(fused: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    p, n = 0.3, 300
    ours = torch.stack([fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(n)])
    theirs = torch.stack([F.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(n)])
    exact = F.scaled_dot_product_attention(q, k, v)
    for samples in (ours, theirs):
        bound = 5 * (samples.var(0) / n).sqrt() + 1e-6  # 5 standard errors of the mean
        assert ((samples.mean(0) - exact).abs() <= bound).all()  # unbiased: 1/(1-p) scaling
    ratio = ours.var(0).mean() / theirs.var(0).mean()
    assert 0.8 < ratio < 1.25, f"dropout spread differs from torch's: variance ratio {ratio:.3f}"
    torch.manual_seed(1)
    first = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(1)
    assert torch.equal(fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p), first)  # reproducible
    if fused:
        torch.manual_seed(1)
        assert not torch.equal(F.scaled_dot_product_attention(q, k, v, dropout_p=p), first)  # not torch's stream


# ----------------------------------------------------------------------------- is_causal hints, every layer


def assert_same_behaviour(ours_fn, torch_fn):
    """torch raises -> ours raises an instance of its type; torch returns -> ours returns the same values."""
    theirs = _raised(torch_fn)
    if theirs is not None:
        ours = _raised(ours_fn)
        assert isinstance(ours, type(theirs)), f"torch raises {type(theirs).__name__}: {theirs}; ours: {ours!r}"
        return
    torch.testing.assert_close(ours_fn(), torch_fn())


def _stack_call(name, module, x, mask, is_causal):
    if name == "TransformerEncoderLayer":
        return module(x, src_mask=mask, is_causal=is_causal)
    if name == "TransformerEncoder":
        return module(x, mask=mask, is_causal=is_causal)
    if name == "Transformer":
        return module(x, x, tgt_mask=mask, tgt_is_causal=is_causal)
    return module(x, x, tgt_mask=mask, tgt_is_causal=is_causal)


CAUSAL_HINTS = {
    "hint without a mask": (None, True),
    "hint with the causal mask": ("causal", True),
    "hint with a zero mask": ("zeros", True),
    "hint with a wrongly shaped mask": ("wrong", True),
    "causal mask, no hint": ("causal", False),
    "causal mask, hint left to detection": ("causal", None),
}


@pytest.mark.parametrize("case", sorted(CAUSAL_HINTS))
@pytest.mark.parametrize("name", sorted(_LAYER_PAIRS))
def test_is_causal_hints_match_torch(name, case):
    ours, theirs = _layer_pair(name)
    ours.eval(), theirs.eval()
    kind, is_causal = CAUSAL_HINTS[case]
    if is_causal is None and name.endswith("Layer"):
        pytest.skip("the layers take a bool hint; detection is the stacks' job")
    torch.manual_seed(0)
    x = torch.randn(4, 2, E)
    mask = {
        None: None,
        "causal": nn.Transformer.generate_square_subsequent_mask(4),
        "zeros": torch.zeros(4, 4),
        "wrong": torch.zeros(3, 3),
    }[kind]
    with torch.no_grad():
        assert_same_behaviour(
            lambda: _stack_call(name, ours, x, mask, is_causal), lambda: _stack_call(name, theirs, x, mask, is_causal)
        )
