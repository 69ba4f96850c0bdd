"""Importing fastformer never fails because Triton or the compiled extension is missing:
the missing backends are reported with the reason and "auto" falls back."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} blocked for this test")
            return None
    sys.meta_path.insert(0, Block())
    """
)

CHECK = textwrap.dedent(
    """
    import torch, fastformer
    report = fastformer.backends()
    for name in {missing!r}:
        assert not report[name]["available"], (name, report[name])
        assert report[name]["reason"], name
    q = torch.randn(1, 2, 16, 8)
    out = fastformer.scaled_dot_product_attention(q, q, q, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, ref)
    try:
        fastformer.scaled_dot_product_attention(q, q, q, backend={missing!r}[0])
    except RuntimeError as exc:
        assert "not available" in str(exc), exc
    else:
        raise AssertionError("forcing a missing backend must raise")
    import fastformer.nn, fastformer.models  # modules import too
    print("ok")
    """
)


# Every public op, module and model, forward and backward on CPU tensors, with the
# blocked packages missing. Each check compares against torch where torch has the op.
EVERYTHING = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    import fastformer, fastformer.nn as ffnn, fastformer.ops as ops, fastformer.models as fm
    from fastformer.integrations import hf
    torch.manual_seed(0)

    def backward(y, *params):
        y.float().square().sum().backward()
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()

    def close(a, b, tol=1e-5):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)

    x = torch.randn(2, 5, 16, requires_grad=True)
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(5, 5); mask[1] = torch.finfo(torch.float32).min
    # attention ops
    for fn in (fastformer.scaled_dot_product_attention, fastformer.attention):
        y = fn(q, k, v, attn_mask=mask); close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        backward(y, q, k, v)
    out, lse = fastformer.attention(q, k, v, is_causal=True, return_lse=True); backward(out, q)
    cache_k, cache_v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    fastformer.decode_attention(q.detach()[:, :, :1], cache_k, cache_v, torch.tensor([3, 9]))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qv, kv_, vv = (torch.randn(5, 2, 8, requires_grad=True) for _ in range(3))
    y = fastformer.varlen_attention(qv, kv_, vv, cu, cu, 3, 3, causal=True); backward(y, qv)
    y = fastformer.softmax(x, mask=torch.zeros(5, 16), scale=0.5); close(y, torch.softmax(x * 0.5, -1)); backward(y, x)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = ops.layer_norm(x, (16,), w, b); close(y, F.layer_norm(x, (16,), w, b)); backward(y, x, w, b)
    y = ops.rms_norm(x, (16,), w); close(y, F.rms_norm(x, (16,), w)); backward(y, x, w)
    w1, w2 = torch.randn(32, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    y = ops.linear_act(x, w1, None, "gelu"); close(y, F.gelu(F.linear(x, w1))); backward(y, w1)
    y = ops.gated_linear(x, w1, None, "silu"); backward(y, w1)
    y = ops.feed_forward(x, w1, None, w2, None, "relu"); close(y, F.linear(F.relu(F.linear(x, w1)), w2), 1e-4)
    backward(y, w2)
    qr, kr = ops.apply_rotary(q, k); backward(qr + kr, q)
    y = ops.add_sinusoidal_positions(x); backward(y, x)
    # modules (and their torch.nn twins through convert)
    for m in (ffnn.LayerNorm(16), ffnn.RMSNorm(16), ffnn.FeedForward(16, 32), ffnn.SinusoidalPositionalEncoding(16),
              ffnn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
              ffnn.TransformerDecoderLayer(16, 2, 32, batch_first=True)):
        y = m(x, x) if isinstance(m, ffnn.TransformerDecoderLayer) else m(x)
        backward(y, *m.parameters())
    mha = ffnn.MultiheadAttention(16, 2, batch_first=True)
    kpm = torch.zeros(2, 5); kpm[1] = torch.finfo(torch.float32).min
    y, _ = mha(x, x, x, key_padding_mask=kpm); backward(y, *mha.parameters())
    enc = ffnn.TransformerEncoder(ffnn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False)
    backward(enc(x), *enc.parameters())
    tr = ffnn.Transformer(16, 2, 1, 1, 32, batch_first=True); backward(tr(x, x), *tr.parameters())
    y1, y2 = ffnn.RotaryEmbedding(8)(q, k); backward(y1 + y2, q)
    pe = ffnn.PatchEmbedding(8, 4, 3, 16); backward(pe(torch.randn(2, 3, 8, 8)), *pe.parameters())
    torch_enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True,
                                                                             norm_first=True), 2,
                                            norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    conv, report = fastformer.convert(torch_enc)
    close(conv(x, src_key_padding_mask=kpm.bool()), torch_enc(x, src_key_padding_mask=kpm.bool()), 1e-4)
    conv.train(); backward(conv(x), *conv.parameters())
    # models
    gpt = fm.GPT(fm.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    ids = torch.randint(0, 50, (2, 8))
    logits, loss = gpt(ids, targets=ids); loss.backward()
    gpt.eval(); gpt.generate(ids[:, :3], max_new_tokens=3)
    bert = fm.BERT(fm.BERTConfig(vocab_size=50, max_position_embeddings=16, hidden_size=16, num_layers=2,
                                 num_heads=2, intermediate_size=32))
    am = torch.ones(2, 8, dtype=torch.long); am[1, 5:] = 0
    o = bert(ids, attention_mask=am, labels=ids); o.loss.backward()
    vit = fm.ViT(img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    backward(vit(torch.randn(2, 3, 8, 8)), *vit.parameters())
    s2s = fm.Seq2SeqTransformer(fm.Seq2SeqConfig(src_vocab_size=50, tgt_vocab_size=50, d_model=16, num_heads=2, num_encoder_layers=1,
                                                 num_decoder_layers=1, dim_feedforward=32, max_len=16))
    out = s2s(ids, ids, ids); (out[1] if isinstance(out, tuple) else out).float().sum().backward()
    s2s.eval(); s2s.generate(ids[:, :4], max_len=5)
    ts = fm.TimeSeriesTransformer(n_features=2, window=8, d_model=16, num_heads=2, num_layers=1)
    backward(ts(torch.randn(2, 8, 2)), *ts.parameters())
    # the Hugging Face attention hook
    y, _ = hf.fastformer_attention_forward(torch.nn.Module(), q, k, v, mask.expand(2, 1, 5, 5))
    backward(y, q)
    print("ok")
    """
)


@pytest.mark.parametrize(
    "blocked",
    [["triton"], ["fastformer._C"], ["triton", "fastformer._C"]],
    ids=["no-triton", "no-extension", "neither"],
)
def test_everything_runs_without(blocked):
    """Issue 16: a CPU install without Triton (the README's plain ``pip install .``) or without
    the compiled extension runs every public op, module and model forward and backward."""
    code = BLOCKER.format(blocked=blocked) + EVERYTHING
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]


@pytest.mark.parametrize(
    "blocked,missing",
    [(["triton"], ["triton"]), (["fastformer._C"], ["cpu", "cuda"]), (["triton", "fastformer._C"], ["triton", "cpu"])],
    ids=["no-triton", "no-extension", "neither"],
)
def test_import_without(blocked, missing):
    code = BLOCKER.format(blocked=blocked) + CHECK.format(missing=missing)
    env_cwd = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=env_cwd)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-4000:]
