"""fastformer.nn transformer layers, stacks and Transformer against torch.nn with the same weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastformer.nn as ffnn
from nn_parity import check_parity, random_mask, single_thread

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

D, H, FF, B, S, T = 16, 4, 32, 3, 6, 5


def tanh_activation(x):
    return torch.tanh(x) * 1.5


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "module": nn.GELU(), "callable": tanh_activation}


def seq(n, batch_first, batched=True, device="cpu"):
    if not batched:
        return torch.randn(n, D, device=device, requires_grad=True)
    shape = (B, n, D) if batch_first else (n, B, D)
    return torch.randn(shape, device=device, requires_grad=True)


def _randomise_norms(*modules):
    # torch initialises LayerNorm to (1, 0); random affine parameters catch swapped weight/bias.
    with torch.no_grad():
        for m in modules:
            for sub in m.modules():
                if isinstance(sub, nn.LayerNorm) or type(sub).__name__ == "LayerNorm":
                    if sub.weight is not None:
                        sub.weight.normal_(1.0, 0.2)
                    if getattr(sub, "bias", None) is not None:
                        sub.bias.normal_(0.0, 0.2)


def encoder_pair(device="cpu", dtype=torch.float32, **kw):
    args = dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, device=device, dtype=dtype)
    args.update(kw)
    t = nn.TransformerEncoderLayer(**args)
    _randomise_norms(t)
    return t, ffnn.TransformerEncoderLayer(**args)


def decoder_pair(device="cpu", dtype=torch.float32, **kw):
    args = dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, device=device, dtype=dtype)
    args.update(kw)
    t = nn.TransformerDecoderLayer(**args)
    _randomise_norms(t)
    return t, ffnn.TransformerDecoderLayer(**args)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_encoder_layer(train, batch_first, norm_first, activation):
    t, ours = encoder_pair(batch_first=batch_first, norm_first=norm_first, activation=ACTIVATIONS[activation])
    kw = dict(src_key_padding_mask=random_mask((B, S), "bool"))
    check_parity(t, ours, [seq(S, batch_first)], kw, train=train)
    if not train:  # eval + no grad: torch's fused fast path (where its conditions hold)
        check_parity(t, ours, [seq(S, batch_first)], kw, train=False, grad=False)


@pytest.mark.parametrize(
    "masks",
    ["none", "src_mask_bool", "src_mask_float", "causal", "causal_detect_hint", "kpm_float", "both_bool", "mask3d"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_masks(masks, bias):
    t, ours = encoder_pair(batch_first=True, bias=bias)
    kw = {}
    if masks == "src_mask_bool":
        kw["src_mask"] = random_mask((S, S), "bool")
    elif masks == "src_mask_float":
        kw["src_mask"] = random_mask((S, S), "float")
    elif masks.startswith("causal"):
        kw["src_mask"] = nn.Transformer.generate_square_subsequent_mask(S)
        kw["is_causal"] = True
    elif masks == "kpm_float":
        kw["src_key_padding_mask"] = random_mask((B, S), "float")
    elif masks == "both_bool":
        kw["src_mask"] = random_mask((S, S), "bool")
        kw["src_key_padding_mask"] = random_mask((B, S), "bool")
    elif masks == "mask3d":
        kw["src_mask"] = random_mask((B * H, S, S), "float")
    check_parity(t, ours, [seq(S, True)], kw, train=True)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_unbatched(norm_first):
    t, ours = encoder_pair(norm_first=norm_first)
    check_parity(t, ours, [seq(S, False, batched=False)], dict(src_key_padding_mask=random_mask((S,), "bool")))


@pytest.mark.parametrize("activation", ["relu", "callable"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_decoder_layer(train, batch_first, norm_first, activation):
    t, ours = decoder_pair(batch_first=batch_first, norm_first=norm_first, activation=ACTIVATIONS[activation])
    kw = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
        tgt_is_causal=True,
        tgt_key_padding_mask=random_mask((B, T), "bool"),
        memory_key_padding_mask=random_mask((B, S), "bool"),
        memory_mask=random_mask((T, S), "bool"),
    )
    check_parity(t, ours, [seq(T, batch_first), seq(S, batch_first)], kw, train=train)


def test_decoder_layer_unbatched():
    t, ours = decoder_pair()
    kw = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(T), tgt_is_causal=True)
    check_parity(t, ours, [seq(T, False, batched=False), seq(S, False, batched=False)], kw)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_encoder_stack(train, with_norm):
    layer_t, layer_f = encoder_pair(batch_first=True)
    t = nn.TransformerEncoder(layer_t, 2, norm=nn.LayerNorm(D) if with_norm else None, enable_nested_tensor=False)
    ours = ffnn.TransformerEncoder(layer_f, 2, norm=nn.LayerNorm(D) if with_norm else None, enable_nested_tensor=False)
    _randomise_norms(t)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    check_parity(t, ours, [seq(S, True)], dict(mask=mask), train=train)  # is_causal=None: detected
    check_parity(t, ours, [seq(S, True)], dict(src_key_padding_mask=random_mask((B, S), "bool")), train=train)


@pytest.mark.parametrize("kpm_kind", ["bool", "float"])
def test_encoder_stack_nested_tensor_zeros(kpm_kind):
    """torch's eval path on nested tensors returns 0 at padded positions; so must we."""
    layer_t, layer_f = encoder_pair(batch_first=True)
    t = nn.TransformerEncoder(layer_t, 2)
    ours = ffnn.TransformerEncoder(layer_f, 2)
    assert t.use_nested_tensor and ours.use_nested_tensor
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    kpm = pad if kpm_kind == "bool" else torch.zeros(B, S).masked_fill(pad, float("-inf"))
    check_parity(t, ours, [seq(S, True)], dict(src_key_padding_mask=kpm), train=False, grad=False)
    ours.load_state_dict(t.state_dict())
    with torch.no_grad():
        out = ours.eval()(torch.randn(B, S, D), src_key_padding_mask=kpm)
    assert (out[pad] == 0).all()


def test_encoder_stack_nested_float_padding_mask_of_ones():
    """pytorch#111276 / #90534: a float src_key_padding_mask of 0/1 values. torch's eval path on
    nested tensors drops every key whose entry is nonzero (the values are not added) and outputs
    0 there; the stack once added the values in its layers and then zeroed the rows, matching
    neither of torch's paths."""
    layer_t, layer_f = encoder_pair(batch_first=True)
    t, ours = nn.TransformerEncoder(layer_t, 2).eval(), ffnn.TransformerEncoder(layer_f, 2).eval()
    ours.load_state_dict(t.state_dict())
    kpm = torch.zeros(B, S)
    kpm[0, S - 2:] = 1.0
    kpm[1, S - 1:] = 1.0
    x = torch.randn(B, S, D)
    with torch.no_grad():
        expected, got = t(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[kpm != 0] == 0).all()


@pytest.mark.parametrize("train", [True, False])
def test_decoder_stack(train):
    layer_t, layer_f = decoder_pair(batch_first=False)
    t = nn.TransformerDecoder(layer_t, 2, norm=nn.LayerNorm(D))
    ours = ffnn.TransformerDecoder(layer_f, 2, norm=nn.LayerNorm(D))
    _randomise_norms(t)
    kw = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(T), memory_key_padding_mask=random_mask((B, S), "bool"))
    check_parity(t, ours, [seq(T, False), seq(S, False)], kw, train=train)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_transformer(train, batch_first, norm_first):
    args = dict(d_model=D, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF, dropout=0.0,
                batch_first=batch_first, norm_first=norm_first)
    t, ours = nn.Transformer(**args), ffnn.Transformer(**args)
    _randomise_norms(t)
    kw = dict(
        tgt_mask=ffnn.Transformer.generate_square_subsequent_mask(T),
        src_key_padding_mask=random_mask((B, S), "bool"),
        memory_key_padding_mask=random_mask((B, S), "bool"),
    )
    check_parity(t, ours, [seq(S, batch_first), seq(T, batch_first)], kw, train=train)


def test_generate_square_subsequent_mask_matches_torch():
    for n in (1, 4, 7):
        assert torch.equal(ffnn.Transformer.generate_square_subsequent_mask(n), nn.Transformer.generate_square_subsequent_mask(n))
    m = ffnn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64)
    assert m.dtype == torch.float64


def test_state_dict_round_trips():
    args = dict(d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=FF)
    for make_t, make_f in (
        (lambda: nn.Transformer(**args), lambda: ffnn.Transformer(**args)),
        (lambda: nn.TransformerEncoderLayer(D, H, FF, bias=False), lambda: ffnn.TransformerEncoderLayer(D, H, FF, bias=False)),
        (lambda: nn.TransformerDecoderLayer(D, H, FF, norm_first=True), lambda: ffnn.TransformerDecoderLayer(D, H, FF, norm_first=True)),
    ):
        t, ours = make_t(), make_f()
        assert list(t.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(t.state_dict())
        back = make_t()
        back.load_state_dict(ours.state_dict())
        for a, b in zip(t.state_dict().values(), back.state_dict().values()):
            assert torch.equal(a, b)


def test_defaults_match_torch():
    t, ours = nn.TransformerEncoderLayer(D, H), ffnn.TransformerEncoderLayer(D, H)
    assert ours.linear1.out_features == t.linear1.out_features == 2048
    assert ours.dropout.p == t.dropout.p == 0.1
    assert ours.norm1.eps == t.norm1.eps and ours.norm_first is t.norm_first is False
    assert ours.self_attn.batch_first is t.self_attn.batch_first is False
    assert ours.activation_relu_or_gelu == t.activation_relu_or_gelu == 1
    tr = ffnn.Transformer()
    assert tr.d_model == 512 and tr.nhead == 8 and len(tr.encoder.layers) == 6 and len(tr.decoder.layers) == 6


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="relu/gelu"):
        ffnn.TransformerEncoderLayer(D, H, activation="swish")
    with pytest.raises(ValueError, match="divisible"):
        ffnn.TransformerEncoderLayer(D, 3)
    tr = ffnn.Transformer(D, H, 1, 1, FF)
    with pytest.raises(RuntimeError, match="batch number"):
        tr(torch.randn(S, B, D), torch.randn(T, B + 1, D))
    with pytest.raises(RuntimeError, match="feature number"):
        tr(torch.randn(S, B, D), torch.randn(T, B, D + 1))


def test_dropout_in_training():
    layer = ffnn.TransformerEncoderLayer(D, H, FF, dropout=0.5)
    x = torch.randn(S, B, D)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_patch_embedding_matches_conv():
    pe = ffnn.PatchEmbedding(img_size=32, patch_size=8, in_chans=3, embed_dim=24)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    conv = nn.Conv2d(3, 24, 8, 8)
    conv.load_state_dict({k.removeprefix("proj."): v for k, v in pe.state_dict().items()})
    assert list(pe.state_dict()) == ["proj.weight", "proj.bias"]
    assert pe.proj.weight.shape == (24, 3, 8, 8)

    class ConvRef(nn.Module):  # timm's PatchEmbed math: conv, flatten, NLC
        def __init__(self):
            super().__init__()
            self.proj = conv

        def forward(self, img):
            return self.proj(img).flatten(2).transpose(1, 2)

    check_parity(ConvRef(), ffnn.PatchEmbedding(32, 8, 3, 24), [x])
    assert pe(x).shape == (2, pe.num_patches, 24) and pe.num_patches == 16


def test_patch_embedding_bad_input():
    pe = ffnn.PatchEmbedding(32, 8, 3, 24, bias=False)
    assert pe.proj.bias is None
    with pytest.raises(ValueError, match="doesn't match"):
        pe(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        ffnn.PatchEmbedding(30, 8)


@pytest.mark.cuda
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_encoder_decoder_layers_bf16_cuda(train, norm_first):
    t, ours = encoder_pair(device="cuda", batch_first=True, norm_first=norm_first, activation="gelu")
    kw = dict(src_key_padding_mask=random_mask((B, S), "bool").cuda())
    check_parity(t, ours, [seq(S, True, device="cuda")], kw, dtype=torch.bfloat16, train=train)
    t, ours = decoder_pair(device="cuda", batch_first=True, norm_first=norm_first)
    kw = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(T, device="cuda"), tgt_is_causal=True)
    check_parity(t, ours, [seq(T, True, device="cuda"), seq(S, True, device="cuda")], kw, dtype=torch.bfloat16, train=train)


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the layers (masks, fused norms, attention), fwd + bwd.

    Attention is pinned to "reference" so this checks the modules' own traceability; the
    fused backends' fake-vs-real stride contract is the attention tests' business.
    """
    import fastformer

    layer = ffnn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=True)
    x = torch.randn(B, S, D, requires_grad=True)
    kpm = random_mask((B, S), "bool")
    with fastformer.use_backend("reference"):
        expected = layer(x, src_key_padding_mask=kpm)  # eager first: attention backends are imported lazily
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        out = compiled(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(out, expected)
        out.backward(torch.randn_like(out))
        mha = ffnn.MultiheadAttention(D, H, add_bias_kv=True)
        q = torch.randn(S, B, D)
        compiled_mha = torch.compile(mha, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled_mha(q, q, q)[0], mha(q, q, q)[0])


def test_replaced_linear1_is_called_in_training():
    """The layers' feed-forward (``nn._fused.linear_act``) calls a replaced or hooked ``linear1``
    as a module, as torch's ``_ff_block`` does (it read ``linear1.weight``, skipping both)."""
    import fastformer.nn as fnn

    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    plain = layer(x)
    handle = layer.linear1.register_forward_hook(lambda mod, inp, out: out + 1.0)
    hooked = layer(x)
    handle.remove()
    ref = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).train()
    ref.load_state_dict(layer.state_dict())
    ref.linear1.register_forward_hook(lambda mod, inp, out: out + 1.0)
    torch.testing.assert_close(hooked, ref(x))
    assert not torch.allclose(hooked, plain)
