"""Backend selection: auto, forced, use_backend, the availability report, fallbacks."""

import subprocess
import sys

import pytest
import torch

import fastformer
from fastformer.ops.attention import registry as dispatch
from fastformer.ops.attention.problem import validate_attention_inputs


def problem(**kw):
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    return validate_attention_inputs(q, k, v, **kw)


def test_backends_report_shape():
    report = fastformer.backends()
    assert set(report) == {"reference", "naive", "triton", "cuda", "cpu"}
    for name, info in report.items():
        assert set(info) == {"available", "auto", "reason", "description"}
        assert info["available"] or info["reason"], f"{name} unavailable without a reason"
    assert report["reference"]["available"] and report["naive"]["available"]
    assert not report["naive"]["auto"], "the naive baseline must never be picked automatically"


def test_backends_report_prints_as_table():
    report = fastformer.backends()
    text = repr(report)
    assert str(report) == text and text.splitlines()[0].split()[:3] == ["backend", "available", "auto"]
    for name, info in report.items():
        line = next(l for l in text.splitlines() if l.split()[0] == name)
        assert line.split()[1] == ("yes" if info["available"] else "no")
        assert (info["description"] if info["available"] else info["reason"]) in line
    assert dict(report) == {k: dict(v) for k, v in report.items()}  # still a plain dict underneath


class _NoCudaExt:
    with_cuda = False


@pytest.mark.parametrize("torch_cuda, gpu, expect", [
    (None, False, "needs a CUDA GPU and a CUDA build of torch"),  # CPU torch: no rebuild can help
    ("12.8", False, "needs a CUDA GPU (none is visible"),
    ("12.8", True, "rebuild with"),                              # CUDA torch and GPU, extension without CUDA
])
def test_cuda_backend_reason_says_what_would_help(monkeypatch, torch_cuda, gpu, expect):
    from fastformer.ops import cuda_device

    monkeypatch.setattr(cuda_device, "C", _NoCudaExt())
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    reason = cuda_device.cuda_extension_unavailable()
    assert expect in reason
    if torch_cuda is None:
        assert "rebuild" not in reason


def test_auto_never_picks_naive_and_falls_back_to_reference(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ["naive"])
    assert dispatch.select_backend(problem()).name == "reference"


def test_auto_skips_backend_that_does_not_support_inputs(monkeypatch):
    fake = dispatch.AttentionBackend(
        name="cpu", description="test double", availability=lambda: None,
        unsupported=lambda p: "head dim 8 unsupported", run=lambda p: None,
    )
    monkeypatch.setitem(dispatch._REGISTRY, "cpu", fake)
    assert dispatch.select_backend(problem()).name == "reference"
    with pytest.raises(ValueError, match="'cpu' does not support these inputs: head dim 8 unsupported"):
        dispatch.select_backend(problem(), "cpu")


def test_auto_skips_unvalidated_backend(monkeypatch):
    fake = dispatch.AttentionBackend(
        name="cpu", description="never run on hardware", availability=lambda: None,
        unsupported=lambda p: None, run=lambda p: None, auto=False,
    )
    monkeypatch.setitem(dispatch._REGISTRY, "cpu", fake)
    assert dispatch.select_backend(problem()).name == "reference"
    assert dispatch.select_backend(problem(), "cpu") is fake  # still usable when asked for


def test_use_backend_context_nests_and_restores():
    p = problem()
    default = dispatch.select_backend(p).name
    with fastformer.use_backend("naive"):
        assert dispatch.select_backend(p).name == "naive"
        with fastformer.use_backend("reference"):
            assert dispatch.select_backend(p).name == "reference"
        assert dispatch.select_backend(p).name == "naive"
        assert dispatch.select_backend(p, "reference").name == "reference"  # explicit wins
    assert dispatch.select_backend(p).name == default


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastformer.use_backend("fast"):
            pass


def test_use_backend_restores_after_exception():
    with pytest.raises(KeyError):
        with fastformer.use_backend("naive"):
            raise KeyError
    assert dispatch._DEFAULT_STACK == []


def test_info_prints_backend_table():
    out = subprocess.run([sys.executable, "-m", "fastformer.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "reference", "naive", "cpu", "cuda", "available"):
        assert word in out.stdout


@pytest.mark.cuda
def test_auto_uses_torch_for_cuda_tensors():
    # Measured slower than torch's SDPA on an H200 (bench/results/nvidia-h200): auto stays on torch.
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    chosen = dispatch.select_backend(validate_attention_inputs(q, k, v))
    assert chosen.name == "reference", chosen.name


def test_auto_never_picks_a_fused_backend_for_cuda_tensors():
    assert dispatch.AUTO_ORDER["cuda"] == []


def test_kernel_ops_auto_on_cuda_follows_the_measured_table():
    """softmax/norm/FFN "auto" on CUDA takes the Triton kernel only where GPU run 3 measured it faster
    than torch (ops.kernel_backend.CUDA_AUTO_MIN_ROW); resolved without a GPU (no tensor needed)."""
    from fastformer.ops.kernel_backend import CUDA_AUTO_MIN_ROW, resolve_backend

    cuda = torch.device("cuda")
    assert CUDA_AUTO_MIN_ROW == {"softmax": 4096}
    assert resolve_backend("auto", cuda, "softmax", ("auto", "triton", "torch", "cuda"), row=8192) == "triton"
    assert resolve_backend("auto", cuda, "softmax", ("auto", "triton", "torch", "cuda"), row=1024) == "torch"
    for op in ("layer_norm", "rms_norm", "linear_act", "gated_linear", "apply_rotary", "add_sinusoidal_positions"):
        assert resolve_backend("auto", cuda, op, row=1 << 16) == "torch", op
    assert resolve_backend("triton", cuda, "layer_norm") == "triton"  # forcing still forces
    assert resolve_backend("auto", torch.device("cpu"), "softmax", ("auto", "triton", "torch", "cuda"), row=8192) == "torch"


def test_plain_sdpa_call_goes_straight_to_torch(monkeypatch):
    """A drop-in call that "auto" would hand unchanged to torch's SDPA skips building the problem
    (~15-20 µs of Python per call: issue 20, auto never slower than torch) and gives torch's
    result bit for bit; anything else (a mask, a forced or default backend, odd inputs, a
    policy that picks the cpu kernels) still goes through validation."""
    import torch.nn.functional as F

    import importlib

    import fastformer

    cpu_backend = importlib.import_module("fastformer.ops.attention.cpu")
    dense = importlib.import_module("fastformer.ops.attention.dense")

    validated = []
    real = dense.validate_attention_inputs
    monkeypatch.setattr(dense, "validate_attention_inputs", lambda *a, **kw: validated.append(1) or real(*a, **kw))

    def straight(*args, **kwargs):
        validated.clear()
        out = fastformer.scaled_dot_product_attention(*args, **kwargs)
        return out, not validated

    q, k, v = (torch.randn(2, 4, 8, 16, dtype=torch.float64) for _ in range(3))  # float64: never the kernels
    out, fast = straight(q, k, v, is_causal=True, scale=0.3)
    assert fast and torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))
    kv = torch.randn(2, 2, 8, 16, dtype=torch.float64)
    out, fast = straight(q, kv, kv, enable_gqa=True)
    assert fast and torch.equal(out, F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))

    assert not straight(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))[1]
    assert not straight(q, k, v, backend="reference")[1]
    with fastformer.use_backend("reference"):
        assert not straight(q, k, v)[1]
    assert not straight(q[0], k[0], v[0])[1]  # 3-D: the general path (leading dims)
    validated.clear()
    with pytest.raises(ValueError):  # heads differ without enable_gqa: our error, from validation
        fastformer.scaled_dot_product_attention(q, kv, kv)
    assert validated
    assert not straight(q, k, v, dropout_p=1)[1]  # an int probability: validated
    assert not straight(q[:, :, :0], k, v)[1]  # empty: validated (torch 2.11's CPU SDPA dies on zero heads)

    if fastformer.backends()["cpu"]["available"]:  # a policy that picks the kernels keeps the full path
        monkeypatch.setattr(cpu_backend, "_AUTO_OVERRIDE", True)
        q32, k32, v32 = (t.float() for t in (q, k, v))
        out, fast = straight(q32, k32, v32)
        assert not fast
        monkeypatch.setattr(cpu_backend, "_AUTO_OVERRIDE", False)
        out, fast = straight(q32, k32, v32)
        assert fast and torch.equal(out, F.scaled_dot_product_attention(q32, k32, v32))
