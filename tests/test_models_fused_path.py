"""Every model's forward and backward runs on fastformer's fused ops (issue 17).

CPU: the op-level Python functions each model calls are recorded (``sys.setprofile``): the
fused FFN (``ops.feed_forward``), the residual-add LayerNorm (``ops.layer_norm`` called with
a ``residual``), rotary / sinusoidal positions, and attention. Triton (interpreter): with the
kernels forced on CPU tensors, the ``fastformer::`` custom ops the dispatcher sees, forward
and backward, are recorded with a ``TorchDispatchMode``.
"""

import os
import sys
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastformer
import fastformer.models as fm
from fastformer.ops.kernel_backend import use_kernel_backend

OPS_DIR = os.path.join(os.path.dirname(fastformer.__file__), "ops")


def _models():
    torch.manual_seed(0)
    ids = torch.randint(3, 40, (2, 8))
    return {
        "gpt": (fm.GPT(fm.GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)),
                lambda m: m(ids, targets=ids)[1]),
        "gpt_rotary_gqa": (fm.GPT(fm.GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2,
                                               n_embd=32, pos_embedding="rotary", activation="silu")),
                           lambda m: m(ids, targets=ids)[1]),
        "bert": (fm.BERT(fm.BERTConfig(vocab_size=40, max_position_embeddings=16, hidden_size=32, num_layers=2,
                                       num_heads=2, intermediate_size=64, dropout=0.0, attention_dropout=0.0)),
                 lambda m: m(ids, labels=ids).loss),
        "vit": (fm.ViT(img_size=8, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2),
                lambda m: m(torch.randn(2, 3, 8, 8)).square().sum()),
        "seq2seq": (fm.Seq2SeqTransformer(fm.Seq2SeqConfig(src_vocab_size=40, tgt_vocab_size=40, d_model=32,
                                                           num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                                           dim_feedforward=64, max_len=16, dropout=0.0)),
                    lambda m: m(ids, ids, ids)[1]),
        "timeseries": (fm.TimeSeriesTransformer(n_features=2, window=8, d_model=32, num_heads=2, num_layers=2),
                       lambda m: m(torch.randn(2, 8, 2)).square().sum()),
    }


# What each model must run: fused FFN, residual + LayerNorm, its positions, attention.
EXPECTED = {
    "gpt": {"feed_forward", "layer_norm+residual", "attention"},
    "gpt_rotary_gqa": {"feed_forward", "layer_norm+residual", "apply_rotary", "attention"},
    "bert": {"feed_forward", "layer_norm+residual", "linear_act", "attention"},
    "vit": {"feed_forward", "layer_norm+residual", "attention"},
    "seq2seq": {"feed_forward", "layer_norm+residual", "add_sinusoidal_positions", "attention"},
    "timeseries": {"feed_forward", "layer_norm+residual", "attention"},
}
_NAMES = {"feed_forward", "linear_act", "gated_linear", "layer_norm", "apply_rotary", "add_sinusoidal_positions",
          "scaled_dot_product_attention", "attention_qkvpacked", "decode_attention"}


def _record_cpu(fn):
    """Names of fastformer.ops functions called while ``fn`` runs (all threads)."""
    seen = set()

    def prof(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_name in _NAMES and code.co_filename.startswith(OPS_DIR):
            name = code.co_name
            if name == "layer_norm" and frame.f_locals.get("residual") is not None:
                seen.add("layer_norm+residual")
            seen.add("attention" if name in ("scaled_dot_product_attention", "attention_qkvpacked") else name)

    threading.setprofile(prof)
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return seen


@pytest.mark.parametrize("name", list(EXPECTED))
def test_models_run_on_the_fused_ops_cpu(name):
    model, loss_fn = _models()[name]
    model.train()
    seen = _record_cpu(lambda: loss_fn(model).backward())
    missing = EXPECTED[name] - seen
    assert not missing, f"{name}: {sorted(missing)} not on the path (saw {sorted(seen)})"


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastformer":
            self.ops.add(func._opname)
        return func(*args, **(kwargs or {}))


TRITON_EXPECTED = {
    "gpt": {"linear_act_fwd", "linear_act_bwd", "norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd"},
    "gpt_rotary_gqa": {"linear_act_fwd", "linear_act_bwd", "norm_fwd", "norm_bwd", "rotary",
                       "attention_fwd", "attention_bwd"},
    "seq2seq": {"linear_act_fwd", "linear_act_bwd", "norm_fwd", "norm_bwd", "add_sinusoidal", "attention_fwd",
                "attention_bwd"},
    "vit": {"linear_act_fwd", "linear_act_bwd", "norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd"},
}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (the test suite sets it)")
@pytest.mark.parametrize("name", list(TRITON_EXPECTED))
def test_models_run_on_the_triton_kernels(name):
    model, loss_fn = _models()[name]
    model.train()
    rec = _OpRecorder()
    with use_kernel_backend("triton"), fastformer.use_backend("triton"), rec:
        loss_fn(model).backward()
    missing = {op for op in TRITON_EXPECTED[name] if not any(seen.startswith(op) for seen in rec.ops)}
    assert not missing, f"{name}: {sorted(missing)} not dispatched (saw {sorted(rec.ops)})"
