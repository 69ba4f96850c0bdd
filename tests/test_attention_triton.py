"""The Triton backend beyond the shared feature matrix (tests/attention_cases.py).

Interpreter tests (CPU, ``TRITON_INTERPRET=1``): head-dim sweep incl. non-powers
of two, lse values, dropout against the kernel's own keep-mask, reproducibility
and statistics, varlen, backward determinism, dispatch reasons. GPU tests
(``@pytest.mark.cuda``): realistic lengths and bf16.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastformer
from attention_cases import Case, check_case, require_backend
from dropout_checks import dropout_all, dropout_matches_explicit_mask, dropout_reproducible, dropout_statistics
from error_rule import assert_close_by_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    require_backend("triton")
    # One config per kernel variant, no timing sweep: every config is a multi-second compile.
    monkeypatch.setenv("FASTFORMER_TRITON_AUTOTUNE", os.environ.get("FASTFORMER_TRITON_AUTOTUNE", "off"))


def _keep_mask(rng_state, shape, p, device):
    from fastformer.kernels.attention_common import dropout_keep_mask

    return dropout_keep_mask(rng_state, shape, p, device)


# ---------------------------------------------------------------- interpreter (CPU) tests


@pytest.mark.parametrize("E,Ev,causal,dtype", [
    (16, 16, False, torch.float32),
    (40, 40, True, torch.float16),
    (64, 32, False, torch.float32),
    (80, 80, False, torch.float16),
    (96, 96, True, torch.float32),
    (128, 128, False, torch.float16),
    (160, 160, True, torch.float32),
    (256, 256, False, torch.float32),
])
def test_head_dims(E, Ev, causal, dtype):
    case = Case(f"hd{E}", batch=(1,), hq=2, L=19, S=21, E=E, Ev=Ev, is_causal=causal)
    check_case(case, "triton", dtype, DEVICE)


@pytest.mark.parametrize("case", [
    Case("br_Lq>Lk_dead_rows", is_causal=True, bottom_right=True, L=40, S=17, batch=(1,), hq=2),
    Case("br_long", is_causal=True, bottom_right=True, L=33, S=70, batch=(1,), hq=2),
    Case("br_gqa", is_causal=True, bottom_right=True, L=20, S=45, hq=4, hkv=2, batch=(1,)),
    Case("causal_tiles", is_causal=True, L=64, S=64, batch=(1,), hq=1),
], ids=lambda c: c.id)
def test_causal_alignments(case):
    check_case(case, "triton", torch.float32, DEVICE)


def test_lse_matches_logsumexp_of_scores():
    B, H, L, S, E = 2, 2, 23, 37, 24
    q, k = torch.randn(B, H, L, E, device=DEVICE), torch.randn(B, H, S, E, device=DEVICE)
    v = torch.randn(B, H, S, 8, device=DEVICE)
    mask = torch.rand(B, 1, L, S, device=DEVICE) > 0.4
    mask[..., 0] = True
    mask[0, 0, 3] = False  # a dead row: lse -inf, output 0
    out, lse = fastformer.attention(q, k, v, attn_mask=mask, scale=0.3, return_lse=True, backend="triton")
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    ref = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
    assert torch.isneginf(lse[0, :, 3]).all() and (out[0, :, 3] == 0).all()
    live = ~torch.isneginf(ref)
    assert torch.equal(live, ~torch.isneginf(lse))
    torch.testing.assert_close(lse[live].double(), ref[live], rtol=0, atol=2e-5)

    # causal bottom-right with Lq > Lk: the first L - S rows see nothing
    out, lse = fastformer.attention(q, k[:, :, :11], v[:, :, :11], is_causal=True, causal_bottom_right=True,
                                    return_lse=True, backend="triton")
    s = (q.double() @ k[:, :, :11].double().transpose(-2, -1)) * E**-0.5
    keep = torch.ones(L, 11, dtype=torch.bool, device=DEVICE).tril(11 - L)
    ref = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)
    assert torch.isneginf(lse[..., : L - 11]).all() and torch.isfinite(lse[..., L - 11:]).all()
    torch.testing.assert_close(lse[..., L - 11:].double(), ref[..., L - 11:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_matches_kernel_keep_mask(is_causal):
    dropout_matches_explicit_mask("triton", _keep_mask, DEVICE, is_causal=is_causal)


def test_dropout_reproducible_and_statistics():
    dropout_reproducible("triton", DEVICE)
    dropout_statistics("triton", DEVICE)
    dropout_all("triton", DEVICE)


def test_dropout_keep_mask_helper_is_a_function_of_rng_state():
    rng = torch.tensor([1234, 56], dtype=torch.int64, device=DEVICE)
    a = _keep_mask(rng, (2, 3, 40, 50), 0.3, DEVICE)
    b = _keep_mask(rng, (2, 3, 40, 50), 0.3, DEVICE)
    c = _keep_mask(torch.tensor([1234, 57], dtype=torch.int64, device=DEVICE), (2, 3, 40, 50), 0.3, DEVICE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # element (b, h, i, j) does not depend on the shape asked for (the kernels tile differently)
    assert torch.equal(_keep_mask(rng, (1, 2, 17, 23), 0.3, DEVICE), a[:1, :2, :17, :23])
    assert abs(a.float().mean().item() - 0.7) < 0.02


def test_gqa_dropout_matches_kernel_keep_mask():
    """Dropout counters use the query head, so grouped heads drop independently."""
    B, Hq, Hkv, L, S, E, p = 1, 4, 2, 18, 21, 16, 0.3
    q = torch.randn(B, Hq, L, E, device=DEVICE, dtype=torch.float64).float().requires_grad_(True)
    k = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=torch.float64).float().requires_grad_(True)
    v = torch.randn(B, Hkv, S, E, device=DEVICE, dtype=torch.float64).float().requires_grad_(True)
    torch.manual_seed(5)
    out = fastformer.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=True, backend="triton")
    torch.manual_seed(5)
    from fastformer.ops.attention.fused import draw_rng_state

    keep = _keep_mask(draw_rng_state(p, q.device), (B, Hq, L, S), p, DEVICE)

    def explicit(qq, kk, vv):
        kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
        w = torch.softmax((qq @ kk.transpose(-2, -1)) * E**-0.5, -1)
        return (w * keep / (1 - p)) @ vv

    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    same = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref, ref_same = explicit(*up), explicit(*same)
    assert_close_by_rule(out, ref, ref_same, name="gqa-dropout/out")
    dout = torch.randn_like(ref)
    for name, a, r, s in zip("qkv", torch.autograd.grad(out, (q, k, v), dout.float()),
                             torch.autograd.grad(ref, up, dout), torch.autograd.grad(ref_same, same, dout.float())):
        assert_close_by_rule(a, r, s, name=f"gqa-dropout/d{name}")


def test_backward_is_deterministic():
    q = torch.randn(1, 4, 50, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 61, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 61, 32, device=DEVICE, requires_grad=True)
    dout = torch.randn(1, 4, 50, 32, device=DEVICE)

    def grads():
        out = fastformer.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True, backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    # (B, L, H, E) storage viewed as (B, H, L, E), as models produce after a projection
    q = torch.randn(2, 19, 3, 16, device=DEVICE).transpose(1, 2).requires_grad_(True)
    k = torch.randn(2, 23, 3, 16, device=DEVICE).transpose(1, 2).requires_grad_(True)
    v = torch.randn(2, 23, 3, 16, device=DEVICE).transpose(1, 2).requires_grad_(True)
    out = fastformer.scaled_dot_product_attention(q, k, v, backend="triton")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-5)


def test_unsupported_inputs_fall_back_or_raise():
    from fastformer.ops.attention.problem import validate_attention_inputs
    from fastformer.ops.attention.triton import _unsupported, dot_precision

    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        fastformer.scaled_dot_product_attention(q, q, q, backend="triton")
    big = torch.randn(1, 1, 4, 288)
    assert "head dim" in _unsupported(validate_attention_inputs(big, big, big))
    mask = torch.zeros(8, 8, requires_grad=True)
    qf = q.float()
    with pytest.raises(ValueError, match="requires grad"):
        fastformer.scaled_dot_product_attention(qf, qf, qf, attn_mask=mask, backend="triton")
    # auto never picks triton on CPU tensors (the interpreter is for testing)
    from fastformer.ops.attention.registry import select_backend

    assert select_backend(validate_attention_inputs(qf, qf, qf)).name != "triton"
    # fp32 precision follows torch's TF32 switch
    assert dot_precision(torch.float16) == "tf32"
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------- varlen


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def check_varlen(lens_q, lens_k, hq, hkv, E, Ev, causal, dtype, device, scale=None):
    cq, ck = _cu(lens_q, device), _cu(lens_k, device)
    q64 = torch.randn(sum(lens_q), hq, E, dtype=torch.float64)
    k64 = torch.randn(sum(lens_k), hkv, E, dtype=torch.float64)
    v64 = torch.randn(sum(lens_k), hkv, Ev, dtype=torch.float64)
    args = (cq, ck, max(lens_q), max(lens_k))
    kw = dict(causal=causal, softmax_scale=scale)
    q, k, v = (t.to(dtype).to(device).requires_grad_(True) for t in (q64, k64, v64))
    out, lse = fastformer.varlen_attention(q, k, v, *args, return_lse=True, backend="triton", **kw)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    same = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref, ref_lse = fastformer.varlen_attention(*up, *args, return_lse=True, backend="reference", **kw)
    ref_same = fastformer.varlen_attention(*same, *args, backend="reference", **kw)
    assert_close_by_rule(out, ref, ref_same, name="varlen/out")
    live = ~torch.isneginf(ref_lse)
    assert torch.equal(live, ~torch.isneginf(lse))
    torch.testing.assert_close(lse[live].double(), ref_lse[live].double(), rtol=0, atol=1e-4)
    dout = torch.randn_like(ref)
    for name, a, r, s in zip("qkv", torch.autograd.grad(out, (q, k, v), dout.to(dtype)),
                             torch.autograd.grad(ref, up, dout), torch.autograd.grad(ref_same, same, dout.to(dtype))):
        assert_close_by_rule(a, r, s, name=f"varlen/d{name}")


@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,E,Ev,causal,dtype", [
    ([5, 17, 0, 33], [9, 17, 4, 20], 2, 2, 16, 16, False, torch.float32),
    ([5, 17, 0, 33], [9, 17, 4, 20], 4, 2, 24, 8, True, torch.float32),  # GQA, Ev != E, bottom-right, dead rows
    ([40, 1, 7], [40, 0, 30], 2, 1, 32, 32, True, torch.float16),  # MQA, an empty key sequence
])
def test_varlen_matches_reference(lens_q, lens_k, hq, hkv, E, Ev, causal, dtype):
    check_varlen(lens_q, lens_k, hq, hkv, E, Ev, causal, dtype, DEVICE)


def test_varlen_single_sequence_equals_dense_with_dropout():
    """One packed sequence is the dense problem: same kernel, same dropout counters."""
    L, S, H, E = 21, 26, 2, 16
    q, k, v = torch.randn(L, H, E, device=DEVICE), torch.randn(S, H, E, device=DEVICE), torch.randn(S, H, E, device=DEVICE)
    torch.manual_seed(3)
    packed = fastformer.varlen_attention(q, k, v, _cu([L], DEVICE), _cu([S], DEVICE), L, S, dropout_p=0.3,
                                         backend="triton")
    torch.manual_seed(3)
    dense = fastformer.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                    dropout_p=0.3, backend="triton")
    torch.testing.assert_close(packed, dense.transpose(0, 1), rtol=0, atol=0)


def test_varlen_validation_errors():
    q = torch.randn(10, 2, 16)
    cu = _cu([4, 6], "cpu")
    ok = (q, q, q, cu, cu, 6, 6)
    fastformer.varlen_attention(*ok, backend="reference")
    with pytest.raises(TypeError, match="int32"):
        fastformer.varlen_attention(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="non-decreasing"):
        fastformer.varlen_attention(q, q, q, torch.tensor([0, 7, 5, 10], dtype=torch.int32), cu, 7, 6)
    with pytest.raises(ValueError, match="packed length"):
        fastformer.varlen_attention(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\]"):
        fastformer.varlen_attention(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        fastformer.varlen_attention(q, q, q, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="same length"):
        fastformer.varlen_attention(q, q, q, cu, _cu([10], "cpu"), 6, 10)
    with pytest.raises(ValueError, match="3-D"):
        fastformer.varlen_attention(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="multiple"):
        fastformer.varlen_attention(torch.randn(10, 3, 16), q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="backend"):
        fastformer.varlen_attention(*ok, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device"):
            fastformer.varlen_attention(q.cuda(), q.cuda(), q.cuda(), cu, cu, 6, 6)


def test_varlen_fallback_matches_padded_sdpa():
    """The per-sequence fallback itself, against padded dense SDPA with a key-padding mask."""
    lens = [3, 7, 5]
    q = torch.randn(sum(lens), 2, 8, dtype=torch.float64)
    cu = _cu(lens, "cpu")
    out = fastformer.varlen_attention(q, q, q, cu, cu, 7, 7, backend="reference")
    padded = torch.zeros(3, 2, 7, 8, dtype=torch.float64)
    for b, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        padded[b, :, : e - s] = q[s:e].transpose(0, 1)
    keep = torch.arange(7)[None, :] < torch.tensor(lens)[:, None]
    dense = F.scaled_dot_product_attention(padded, padded, padded, attn_mask=keep[:, None, None, :])
    for b, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        torch.testing.assert_close(out[s:e], dense[b, :, : e - s].transpose(0, 1))


def test_varlen_op_fake_and_schema():
    from fastformer.ops.attention.fused import varlen_attention_fwd

    q = torch.randn(12, 2, 16)
    cu = _cu([5, 7], "cpu")
    torch.library.opcheck(varlen_attention_fwd, (q, q, q, cu, cu, None, torch.rand(2, 2), 7, 7, 0.0, True, True, 0.25,
                                                 3, -1, 2.0, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- GPU (realistic shapes, bf16)


@pytest.mark.cuda
@pytest.mark.parametrize("L", [1, 17, 1000, 4097, 16384])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_realistic_lengths_bf16(L, causal):
    hq = 2 if L >= 4097 else 4
    check_case(Case(f"L{L}", batch=(1,), hq=hq, hkv=hq // 2, L=L, S=L, E=128, is_causal=causal), "triton",
               torch.bfloat16, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("E,dtype", [
    (16, torch.bfloat16), (40, torch.bfloat16), (64, torch.float32), (80, torch.bfloat16),
    (96, torch.float16), (128, torch.float16), (160, torch.bfloat16), (256, torch.bfloat16),
])
def test_gpu_head_dims(E, dtype):
    check_case(Case(f"hd{E}", batch=(2,), hq=4, hkv=2, L=300, S=333, E=E, is_causal=E % 64 == 0), "triton",
               dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("case", [
    Case("br_decode", is_causal=True, bottom_right=True, L=7, S=1500, batch=(2,), hq=8, hkv=2, E=128),
    Case("cross_mask", mask="bool", mask_shape="B11S", L=513, S=1029, batch=(2,), hq=4, E=64),
    Case("float_mask_dead", mask="float", mask_shape="BHLS", dead_rows=True, L=257, S=300, batch=(2,), hq=2, E=64),
], ids=lambda c: c.id)
def test_gpu_features_bf16(case):
    check_case(case, "triton", torch.bfloat16, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dropout(dtype):
    dropout_matches_explicit_mask("triton", _keep_mask, "cuda", dtype=dtype, L=300, S=517)
    dropout_matches_explicit_mask("triton", _keep_mask, "cuda", dtype=dtype, L=300, S=300, is_causal=True)
    dropout_reproducible("triton", "cuda", dtype=dtype)
    dropout_statistics("triton", "cuda", dtype=dtype)


@pytest.mark.cuda
def test_gpu_varlen_bf16():
    check_varlen([1, 1000, 17, 4097, 0], [5, 1000, 300, 4097, 3], 8, 2, 128, 128, True, torch.bfloat16, "cuda")
    check_varlen([129, 77], [500, 77], 4, 4, 64, 64, False, torch.float16, "cuda")


@pytest.mark.cuda
def test_gpu_backward_deterministic_and_long_context():
    q = torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # 65536 tokens, 16 heads: memory stays linear in L (the naive matrix would need 128 GiB)
    q = torch.randn(1, 16, 65536, 64, device="cuda", dtype=torch.bfloat16)
    out = fastformer.scaled_dot_product_attention(q, q, q, is_causal=True, backend="triton")
    assert torch.isfinite(out).all()
    assert math.isfinite(out.float().abs().max().item())


# ---------------------------------------------------------------- autotune pruning (GPU config lists, checked on CPU)


@pytest.mark.parametrize("mode", ["small", "off", "full"])
def test_autotune_pruning_keeps_fitting_preferred_configs(mode, monkeypatch):
    from fastformer.kernels import attention_bwd as bwd
    from fastformer.kernels import attention_fwd as fwd
    from fastformer.kernels.attention_common import head_block

    monkeypatch.setenv("FASTFORMER_TRITON_AUTOTUNE", mode)
    kernels = [
        (fwd.fwd_configs(interpret=False), fwd.prune_fwd, fwd._fwd_fits, fwd._fwd_preferred),
        (bwd.bwd_configs(True, interpret=False), bwd.prune_dkdv, bwd._dkdv_fits, bwd._dkdv_preferred),
        (bwd.bwd_configs(False, interpret=False), bwd.prune_dq, bwd._dq_fits, bwd._dq_preferred),
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for E in (16, 40, 64, 80, 128, 160, 256):
            for tune_lq in (16, 4096):
                args = {"Q": torch.empty(0, dtype=dtype), "TUNE_LQ": tune_lq, "TUNE_LK": 4096}
                kw = {"BLOCK_D": head_block(E), "BLOCK_DV": head_block(E)}
                for configs, prune, fits, preferred in kernels:
                    chosen = prune(configs, args, **kw)
                    assert 1 <= len(chosen) <= {"small": 3, "off": 1, "full": len(configs)}[mode]
                    assert all(fits(c, {**args, **kw}) for c in chosen), (prune.__name__, E, dtype)
                    if mode != "full" and dtype == torch.bfloat16:
                        # the preferred lists were measured spill-free: they must pass their own rule
                        top = chosen[0]
                        assert (top.kwargs["BLOCK_M"], top.kwargs["BLOCK_N"], top.num_warps, top.num_stages) in preferred(
                            {**args, **kw}), (prune.__name__, E)


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter accepts code the GPU compiler rejects: compile every kernel for
    sm_90a (no GPU needed; a subprocess, since kernels under the interpreter can't be
    compiled), plain and with every feature on, and check ptxas's spills and pipelining."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parents[1] / "bench" / "attention_triton_ptxas.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--check"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


@pytest.mark.parametrize("tiles", [((16, 64), (64, 16), (16, 32)), ((64, 32), (32, 32), (64, 16))],
                         ids=["narrow_q", "wide_q"])
def test_other_tilings(tiles, monkeypatch):
    """Stage boundaries (full vs diagonal tiles, causal offsets) must not depend on the
    interpreter's one tiling: rerun causal, bottom-right, GQA and varlen cases with others."""
    import triton

    from fastformer.kernels import attention_bwd as bwd
    from fastformer.kernels import attention_fwd as fwd

    if not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("tiling override is for the interpreter's single-config autotuners")
    for kernel, (bm, bn) in zip((fwd._attn_fwd, bwd._attn_bwd_dkdv, bwd._attn_bwd_dq), tiles):
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)])
    for case in (Case("causal", is_causal=True, L=45, S=45, batch=(1,), hq=2),
                 Case("br_gqa", is_causal=True, bottom_right=True, L=30, S=77, hq=4, hkv=2, batch=(1,)),
                 Case("br_dead", is_causal=True, bottom_right=True, L=50, S=21, batch=(1,), hq=1),
                 Case("mask", mask="bool", mask_shape="B11S", L=33, S=40, batch=(2,), hq=2)):
        check_case(case, "triton", torch.float32, DEVICE)
    check_varlen([5, 40, 0, 19], [70, 33, 4, 1], 2, 1, 16, 16, True, torch.float32, DEVICE)


def test_varlen_op_compiles_fullgraph_on_packed_qkv_views():
    """q, k, v as non-contiguous views of one packed qkv tensor, through torch.compile."""
    from fastformer.ops.attention.fused import varlen_attention_fwd

    cu = _cu([5, 9], DEVICE)
    qkv = torch.randn(14, 3, 2, 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(1)

    def f(q, k, v):
        return varlen_attention_fwd(q, k, v, cu, cu, None, None, 9, 9, 0.0, True, True, 0.25, -1, -1, 0.0, "triton")[0]

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    out.sum().backward()
    ref = fastformer.varlen_attention(q.detach(), k.detach(), v.detach(), cu, cu, 9, 9, causal=True,
                                      softmax_scale=0.25, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.isfinite(qkv.grad).all() and qkv.grad.abs().sum() > 0
