"""fastformer.convert: swaps torch.nn transformer modules, keeps weights/device/dtype/mode, output unchanged."""

import copy
import sys

import pytest
import torch
from torch import nn

import fastformer
import fastformer.nn as ffnn
from fastformer.convert import ConversionReport, register_converter  # noqa: F401
from nn_parity import single_thread
from error_rule import assert_close_by_rule

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

D, H = 16, 4


class Model(nn.Module):
    """A bit of everything convert knows, nested, plus modules it must leave alone."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True), 2, norm=nn.LayerNorm(D), enable_nested_tensor=False
        )
        self.seq2seq = nn.Transformer(D, H, 1, 1, 32, dropout=0.0, batch_first=True, norm_first=True, activation="gelu")
        self.cross = nn.MultiheadAttention(D, H, kdim=8, vdim=8, add_bias_kv=True, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4))

    def forward(self, x):
        h = self.encoder(self.embed(x), mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]))
        h = self.seq2seq(h, h)
        h = h + self.cross(h, x, x, need_weights=False)[0]
        return self.head(h)


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _check_same_output(model, new, x):
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        expected64 = ref64(x.double())
        theirs = model(x)
        ours = new(x)
    assert_close_by_rule(ours, expected64, theirs)


@pytest.mark.parametrize("train", [False, True])
def test_convert_model_output_unchanged(train):
    model = _randomise(Model()).train(train)
    x = torch.randn(2, 7, 8)
    new, report = fastformer.convert(model)
    assert new is not model
    assert isinstance(report, ConversionReport)
    counts = report.counts()
    assert counts["torch.nn.modules.transformer.TransformerEncoderLayer"] == 3  # 2 + seq2seq's encoder layer
    assert counts["torch.nn.modules.transformer.TransformerDecoderLayer"] == 1
    assert counts["torch.nn.modules.activation.MultiheadAttention"] == 1
    assert counts["torch.nn.modules.normalization.LayerNorm"] == 4  # encoder norm, 2 seq2seq norms, head
    assert counts["torch.nn.modules.transformer.Transformer"] == 1
    assert isinstance(new.encoder, ffnn.TransformerEncoder) and isinstance(new.encoder.layers[1], ffnn.TransformerEncoderLayer)
    assert isinstance(new.seq2seq.decoder.layers[0], ffnn.TransformerDecoderLayer)
    assert isinstance(new.cross, ffnn.MultiheadAttention) and isinstance(new.head[0], ffnn.LayerNorm)
    assert type(new.embed) is nn.Linear  # untouched
    assert not any(type(m) in (nn.MultiheadAttention, nn.TransformerEncoderLayer) for m in new.modules())
    assert all(m.training == train for m in new.modules())
    _check_same_output(model, new, x)
    assert "swapped" in str(report)


def test_convert_state_dict_and_original_untouched():
    model = Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, _ = fastformer.convert(model)
    assert list(new.state_dict()) == list(model.state_dict())
    for k, v in new.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(model.cross) is nn.MultiheadAttention  # inplace=False left it alone
    model.load_state_dict(new.state_dict())  # and back


def test_convert_inplace_keeps_parameter_objects():
    model = Model()
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    new, report = fastformer.convert(model, inplace=True)
    assert new is model
    assert isinstance(model.cross, ffnn.MultiheadAttention)
    for name, p in new.named_parameters():
        assert p is params[name], name
    # the optimizer built before the conversion still trains the converted model
    loss = new(torch.randn(2, 5, 8)).square().mean()
    loss.backward()
    w = new.cross.out_proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(w, new.cross.out_proj.weight)


def test_convert_keeps_dtype_requires_grad_and_mixed_modes():
    model = Model().double()
    model.encoder.layers[0].eval()
    model.head[0].weight.requires_grad_(False)
    new, _ = fastformer.convert(model)
    assert all(p.dtype == torch.float64 for p in new.parameters())
    assert not new.head[0].weight.requires_grad
    assert new.encoder.layers[0].training is False and new.encoder.layers[1].training is True
    assert new.encoder.layers[0].self_attn.training is False


def test_convert_root_module():
    layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0)
    new, report = fastformer.convert(layer)
    assert isinstance(new, ffnn.TransformerEncoderLayer) and len(report.swapped) == 1
    x = torch.randn(5, 2, D)
    torch.testing.assert_close(new(x), layer(x), atol=1e-5, rtol=1e-5)


def test_convert_skips_subclasses_and_hooked_modules():
    class MyMHA(nn.MultiheadAttention):
        pass

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MyMHA(D, H)
            self.b = nn.MultiheadAttention(D, H)
            self.c = nn.MultiheadAttention(D, H)

    w = Wrapper()
    w.c.register_forward_hook(lambda *a: None)
    new, report = fastformer.convert(w)
    assert type(new.a) is MyMHA and type(new.c) is nn.MultiheadAttention
    assert isinstance(new.b, ffnn.MultiheadAttention)
    reasons = dict(report.skipped)
    assert "subclasses" in reasons["a"] and "hooks" in reasons["c"]


def test_convert_keeps_hooks_and_subclasses_inside_a_layer():
    """A hook on a submodule the swap would rebuild (linear1, self_attn) and an nn.Linear subclass
    in linear1 (a LoRA-style wrapper whose forward the fused feed-forward would bypass) keep the
    layer torch's: outputs unchanged, reported; a hook inside an encoder stack still fires."""
    x = torch.randn(2, 5, D)
    layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True)
    layer.linear1.register_forward_hook(lambda m, i, o: o * 0)
    new, report = fastformer.convert(layer)
    assert type(new) is nn.TransformerEncoderLayer
    assert any("hooks (on linear1)" in why for _, why in report.skipped)
    torch.testing.assert_close(new(x), layer(x))

    class LoRA(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 0 + 1.0

    layer = nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True)
    layer.linear1 = LoRA(D, 32)
    new, report = fastformer.convert(layer)
    assert type(new) is nn.TransformerEncoderLayer and any("LoRA, not nn.Linear" in why for _, why in report.skipped)
    torch.testing.assert_close(new(x), layer(x))

    stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    fired = []
    stack.layers[0].self_attn.register_forward_hook(lambda m, i, o: fired.append(1))
    new, report = fastformer.convert(stack)
    assert isinstance(new, ffnn.TransformerEncoder) and isinstance(new.layers[1], ffnn.TransformerEncoderLayer)
    assert type(new.layers[0]) is nn.TransformerEncoderLayer
    new(x)
    assert fired == [1]


def test_convert_layer_with_replaced_parts_converts_children():
    layer = nn.TransformerEncoderLayer(D, H, 32)
    layer.norm1 = nn.RMSNorm(D)
    new, report = fastformer.convert(layer)
    assert type(new) is nn.TransformerEncoderLayer  # cannot swap the whole layer...
    assert isinstance(new.self_attn, ffnn.MultiheadAttention)  # ...but its attention and norm2 are
    assert isinstance(new.norm2, ffnn.LayerNorm)
    assert any("norm1" in why for _, why in report.skipped)
    # torch's layer keeps its eval fast path, which calls our MHA's merge_masks and weights
    layer.eval()
    new.eval()
    x = torch.randn(2, 5, D)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": kpm}, {"src_mask": torch.zeros(5, 5)}):
            torch.testing.assert_close(new(x.transpose(0, 1), **kw), layer(x.transpose(0, 1), **kw), atol=1e-5, rtol=1e-5)
    class MyLayerNorm(nn.LayerNorm):  # blocks our whole-layer swap, not torch's fast path
        pass

    bf = nn.TransformerEncoderLayer(D, H, 32, batch_first=True).eval()
    bf.norm1 = MyLayerNorm(D)
    new_bf, _ = fastformer.convert(bf)
    assert type(new_bf) is nn.TransformerEncoderLayer and isinstance(new_bf.self_attn, ffnn.MultiheadAttention)
    with torch.no_grad():
        for kw in ({"src_key_padding_mask": kpm}, {"src_mask": torch.zeros(5, 5), "src_key_padding_mask": kpm}):
            torch.testing.assert_close(new_bf(x, **kw), bf(x, **kw), atol=1e-5, rtol=1e-5)


def test_register_converter_and_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        fastformer.convert("not a model")

    class Custom(nn.Module):
        def forward(self, x):
            return x

    class Replacement(nn.Module):
        def forward(self, x):
            return x + 0

    register_converter(Custom, lambda old: Replacement())
    try:
        new, report = fastformer.convert(nn.Sequential(Custom()))
        assert isinstance(new[0], Replacement)
    finally:  # the module, not the package attribute (which is the function)
        sys.modules["fastformer.convert"]._CONVERTERS.pop(Custom)


@pytest.mark.parametrize("norm", ["affine", "no_bias", "no_affine", "rms"])
def test_convert_norms(norm):
    if norm == "rms":
        old = nn.RMSNorm(D, eps=1e-6)
    else:
        old = nn.LayerNorm(D, bias=norm != "no_bias", elementwise_affine=norm != "no_affine")
    _randomise(old)
    new, report = fastformer.convert(old)
    assert isinstance(new, ffnn.RMSNorm if norm == "rms" else ffnn.LayerNorm) and len(report.swapped) == 1
    assert list(new.state_dict()) == list(old.state_dict())
    x = torch.randn(3, 5, D)
    _check_same_output(old, new, x)
