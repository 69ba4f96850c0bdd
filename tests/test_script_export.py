"""TorchScript and ``torch.export`` on the drop-in modules and the models (issue 22).

* ``torch.jit.script`` compiles every drop-in module and any function that calls
  ``fastformer.scaled_dot_product_attention`` (a builtin that scripts to the
  ``fastformer::scaled_dot_product_attention`` op); the scripted module gives the
  eager output, saves, loads and runs again.
* ``torch.export.export`` captures the modules and the models; the exported program
  gives the eager output and survives ``torch.export.save`` / ``load``.
"""

import io
import warnings

import pytest
import torch

import fastformer
from fastformer import nn as fnn


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.13
        warnings.simplefilter("ignore", UserWarning)
        yield


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _modules():
    """name -> (module, example args). Small shapes: the CPU test machine is shared."""
    x, mem = torch.randn(5, 2, 8), torch.randn(6, 2, 8)
    return {
        "MultiheadAttention(kdim, vdim)": (
            fnn.MultiheadAttention(128, 8, kdim=256, vdim=256),
            (torch.randn(5, 2, 128), torch.randn(7, 2, 256), torch.randn(7, 2, 256)),
        ),
        "MultiheadAttention(batch_first, bias_k, zero_attn)": (
            fnn.MultiheadAttention(8, 2, add_bias_kv=True, add_zero_attn=True, batch_first=True),
            (torch.randn(2, 5, 8),) * 3,
        ),
        "TransformerEncoderLayer(8, 4, 32)": (fnn.TransformerEncoderLayer(8, 4, 32), (x,)),
        "TransformerEncoderLayer(norm_first, gelu)": (
            fnn.TransformerEncoderLayer(8, 4, 32, activation="gelu", norm_first=True), (x,)
        ),
        "TransformerEncoder": (
            fnn.TransformerEncoder(fnn.TransformerEncoderLayer(8, 4, 32), 2, norm=fnn.LayerNorm(8)), (x,)
        ),
        "TransformerDecoderLayer": (fnn.TransformerDecoderLayer(8, 4, 32), (x, mem)),
        "TransformerDecoder": (fnn.TransformerDecoder(fnn.TransformerDecoderLayer(8, 4, 32), 2), (x, mem)),
        "Transformer": (fnn.Transformer(8, 4, 1, 1, 32), (mem, x)),
        "LayerNorm": (fnn.LayerNorm(8), (x,)),
        "RMSNorm": (fnn.RMSNorm(8), (x,)),
    }


MODULE_NAMES = sorted(_modules())


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_script_module_save_load(name):
    torch.manual_seed(0)
    module, args = _modules()[name]
    module.eval()
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        want = _first(module(*args))
        torch.testing.assert_close(_first(scripted(*args)), want)
        torch.testing.assert_close(_first(loaded(*args)), want)


def test_script_multihead_attention_masks_and_grads():
    torch.manual_seed(0)
    mha = fnn.MultiheadAttention(8, 2)
    scripted = torch.jit.script(mha)
    x = torch.randn(4, 3, 8, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4)
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[0, -1] = True
    for kwargs in (
        dict(attn_mask=causal, is_causal=True, need_weights=False),
        dict(key_padding_mask=kpm, need_weights=True, average_attn_weights=False),
        dict(attn_mask=causal > -1, key_padding_mask=kpm, need_weights=False),
    ):
        want = mha(x, x, x, **kwargs)
        got = scripted(x, x, x, **kwargs)
        torch.testing.assert_close(got[0], want[0])
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1])
        (g_want,) = torch.autograd.grad(want[0].sum(), x)
        (g_got,) = torch.autograd.grad(got[0].sum(), x)
        torch.testing.assert_close(g_got, g_want)


def test_script_errors_still_raise():
    """Scripted, errors surface as ``torch.jit.Error`` carrying the message, as from torch's scripted module."""
    ours = torch.jit.script(fnn.MultiheadAttention(8, 2))
    theirs = torch.jit.script(torch.nn.MultiheadAttention(8, 2))
    x = torch.randn(4, 3, 8)
    for module in (ours, theirs):
        with pytest.raises(torch.jit.Error, match="shape of the 2D attn_mask"):
            module(x, x, x, attn_mask=torch.zeros(5, 5))
        with pytest.raises(torch.jit.Error, match="embedding dimension"):
            module(torch.randn(4, 3, 6), x, x)


def sdpa_user(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    causal = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True)
    return causal + fastformer.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)


def test_script_function_calling_sdpa():
    torch.manual_seed(0)
    scripted = torch.jit.script(sdpa_user)
    assert "fastformer::scaled_dot_product_attention" in str(scripted.graph)
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    want = sdpa_user(q, k, v, mask)
    got = scripted(q, k, v, mask)
    torch.testing.assert_close(got, want)
    grads_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    grads_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(q, k, v, mask), want)


def test_sdpa_op_matches_function():
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(
        torch.ops.fastformer.scaled_dot_product_attention(q, q, q, None, 0.0, True),
        fastformer.scaled_dot_product_attention(q, q, q, is_causal=True),
    )


def _export_roundtrip(module, args):
    module.eval()
    with torch.no_grad():
        want = module(*args)
    program = torch.export.export(module, args)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        got = program.module()(*args)
        got_loaded = loaded.module()(*args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_loaded, want)


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_export_module_save_load(name):
    torch.manual_seed(0)
    _export_roundtrip(*_modules()[name])


def _models():
    from fastformer.models.bert import BERT, BERTConfig
    from fastformer.models.gpt import GPT, GPTConfig
    from fastformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from fastformer.models.timeseries import TimeSeriesTransformer
    from fastformer.models.vit import ViT

    ids = torch.randint(3, 50, (2, 8))
    return {
        "GPT": (GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)), (ids,)),
        "GPT(rotary, gqa)": (
            GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=16, pos_embedding="rotary")),
            (ids,),
        ),
        "BERT": (
            BERT(BERTConfig(vocab_size=64, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32)),
            (ids,),
        ),
        "ViT": (
            ViT(img_size=16, patch_size=8, num_classes=5, embed_dim=16, depth=2, num_heads=2),
            (torch.randn(2, 3, 16, 16),),
        ),
        "Seq2SeqTransformer": (
            Seq2SeqTransformer(Seq2SeqConfig(src_vocab_size=64, tgt_vocab_size=64, d_model=16, num_heads=2,
                                             num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                                             max_len=16)),
            (ids, ids[:, :6]),
        ),
        "TimeSeriesTransformer": (
            TimeSeriesTransformer(n_features=3, window=8, d_model=16, num_heads=2, num_layers=1),
            (torch.randn(2, 8, 3),),
        ),
    }


@pytest.mark.parametrize("name", ["GPT", "GPT(rotary, gqa)", "BERT", "ViT", "Seq2SeqTransformer", "TimeSeriesTransformer"])
def test_export_model_save_load(name):
    torch.manual_seed(0)
    _export_roundtrip(*_models()[name])


def test_scripted_encoder_padding_matches_torchs_scripted():
    """torch's scripted encoder takes its nested-tensor path too (zeros at padding); so does ours."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2).eval()
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 8)
    pad = torch.tensor([[False, False, False, True], [False, False, False, False]])
    with torch.no_grad():
        want = torch.jit.script(theirs)(x, src_key_padding_mask=pad)
        got = torch.jit.script(ours)(x, src_key_padding_mask=pad)
    assert (got[0, 3] == 0).all()
    torch.testing.assert_close(got, want)
