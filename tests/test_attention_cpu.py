"""The "cpu" backend beyond the shared feature matrix (tests/test_attention_backends.py):
head dims 1…256, long and odd lengths, dropout against its own keep-mask, thread
counts, non-contiguous inputs, every ISA variant this machine runs, and the
boundary checks of the C++ entry points."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastformer
from attention_cases import Case, check_case, require_backend
from dropout_checks import dropout_all, dropout_matches_explicit_mask, dropout_reproducible, dropout_statistics
from error_rule import assert_close_by_rule
from isa_variants import VARIANTS, run_under_variant

DTYPES = [torch.float32, torch.bfloat16]
_ids = lambda t: str(t).split(".")[-1]  # noqa: E731


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("E", [1, 2, 3, 7, 16, 33, 64, 96, 128, 129, 200, 256])
def test_head_dims(E, dtype):
    check_case(Case(f"E{E}", batch=(1,), hq=2, L=21, S=37, E=E), "cpu", dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_value_head_dim_differs(dtype):
    check_case(Case("Ev", batch=(1,), hq=2, L=19, S=40, E=256, Ev=3, is_causal=True), "cpu", dtype, "cpu")


@pytest.mark.parametrize("case", [
    Case("L300", batch=(1,), hq=2, L=300, S=300, E=40),
    Case("L300_causal", batch=(1,), hq=2, L=300, S=300, E=24, is_causal=True),
    Case("L131_S300_bottom_right", batch=(1,), hq=2, hkv=1, L=131, S=300, E=16, is_causal=True, bottom_right=True),
    Case("L300_S131_bottom_right", batch=(1,), hq=1, L=300, S=131, E=16, is_causal=True, bottom_right=True),
    Case("L257_mask", batch=(2,), hq=2, L=257, S=199, E=8, mask="bool", mask_shape="B11S"),
], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_long_odd_lengths(case, dtype):
    check_case(case, "cpu", dtype, "cpu")


# Many key tiles per row and query blocks per head (the default tiles, 96 x 256 forward and
# 96 x 128 backward, leave short sequences in one or two): every online-softmax rescale,
# the tile skipping and the remainders, in both kernels.
@pytest.mark.parametrize("case", [
    Case("tiles", batch=(1,), hq=2, L=77, S=101, E=24),
    Case("tiles_causal_gqa", batch=(1,), hq=4, hkv=2, L=90, S=90, E=16, is_causal=True),
    Case("tiles_float_mask", batch=(2,), hq=2, L=45, S=130, E=8, mask="float", mask_shape="B11S"),
    Case("tiles_bool_mask", batch=(1,), hq=2, L=40, S=99, E=16, mask="bool", mask_shape="BHLS"),
    Case("tiles_causal_br", batch=(1,), hq=2, L=40, S=99, E=16, is_causal=True, bottom_right=True),
], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_small_tiles(case, dtype, monkeypatch):
    monkeypatch.setenv("FASTFORMER_CPU_ATTN_BQ", "10")
    monkeypatch.setenv("FASTFORMER_CPU_ATTN_BK", "16")  # rounded up to the micro-kernel's width
    check_case(case, "cpu", dtype, "cpu")


@pytest.mark.parametrize("is_causal", [False, True])
def test_length_1000_forward(is_causal):
    check_case(Case("L1000", batch=(1,), hq=1, L=1000, S=1000, E=32, is_causal=is_causal), "cpu", torch.float32,
               "cpu", grads=False)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("is_causal", [False, True])
def test_thread_counts(threads, is_causal):
    """Same answer (under the rule) on 1 and 2 threads; the forward is bitwise independent of them."""
    before = torch.get_num_threads()
    q, k, v = (torch.randn(1, 3, n, 24) for n in (150, 170, 170))
    try:
        torch.set_num_threads(threads)
        check_case(Case("threads", batch=(1,), hq=3, hkv=1, L=150, S=170, E=24, is_causal=is_causal), "cpu",
                   torch.float32, "cpu")
        out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal, backend="cpu")
        torch.set_num_threads(1 if threads == 2 else 2)
        again = fastformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, again)


def _check_inputs(q, k, v, dtype, **kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fastformer.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    up = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw64 = dict(kw)
    if kw.get("attn_mask") is not None and kw["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw["attn_mask"].double()
    ref = F.scaled_dot_product_attention(*up, **kw64)
    same_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    same = F.scaled_dot_product_attention(*same_in, **kw)
    assert_close_by_rule(out, ref, same, name="out")
    dout = torch.randn_like(ref)
    for name, a, r, s in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout.to(dtype)),
                             torch.autograd.grad(ref, up, dout), torch.autograd.grad(same, same_in, dout.to(dtype))):
        assert_close_by_rule(a, r, s, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "gqa_expanded"])
def test_non_contiguous(layout, dtype):
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    kw = {}
    if layout == "transposed":  # (B, L, H, E) memory read as (B, H, L, E)
        q, k, v = (rnd(2, n, 3, 16).transpose(1, 2) for n in (70, 90, 90))
    elif layout == "sliced":  # last-dim stride 2
        q, k, v = (rnd(2, 3, n, 40)[..., ::2][:, :, 1:] for n in (66, 81, 81))
    elif layout == "expanded":  # batch broadcast with stride 0
        q = rnd(2, 3, 65, 16)
        k, v = (rnd(1, 3, 77, 16).expand(2, 3, 77, 16) for _ in range(2))
    else:  # GQA over K/V heads that are themselves a stride-0 view
        q = rnd(1, 4, 33, 8)
        k, v = (rnd(1, 1, 40, 8).expand(1, 2, 40, 8) for _ in range(2))
        kw["enable_gqa"] = True
    _check_inputs(q, k, v, dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_non_contiguous_grad_output(layout, dtype, is_causal):
    """The backward reads the output gradient through its strides (no contiguous copy: in training
    it arrives transposed from the output projection): the gradients equal those of a contiguous
    copy bit for bit."""
    q, k, v = (torch.randn(2, 3, 70, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=is_causal, backend="cpu")
    if layout == "transposed":  # (B, L, H, E) memory read as (B, H, L, E)
        dout = torch.randn(2, 70, 3, 16, dtype=dtype).transpose(1, 2)
    elif layout == "sliced":  # last-dim stride 2
        dout = torch.randn(2, 3, 70, 32, dtype=dtype)[..., ::2]
    else:  # broadcast over the batch with stride 0
        dout = torch.randn(1, 3, 70, 16, dtype=dtype).expand(2, 3, 70, 16)
    assert not dout.is_contiguous()
    strided = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    contiguous = torch.autograd.grad(out, (q, k, v), dout.contiguous())
    for name, a, b in zip(("dq", "dk", "dv"), strided, contiguous):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_mask_strides(dtype):
    """A float mask that is itself a strided (transposed) view, broadcast over heads."""
    base = torch.randn(1, 1, 45, 30, dtype=torch.float64).to(dtype)
    mask = base.transpose(-1, -2)  # (1, 1, 30, 45), non-contiguous
    mask[..., 0, 3:9] = float("-inf")
    q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64).to(dtype) for n in (30, 45, 45))
    _check_inputs(q, k, v, dtype, attn_mask=mask)


# ----------------------------------------------------------------------------- dropout

def _keep_mask(rng_state, shape, p, device):
    from fastformer.ops.attention.cpu import dropout_keep_mask

    return dropout_keep_mask(rng_state, shape, p, device)


def test_dropout_statistics():
    dropout_statistics("cpu", "cpu")


def test_dropout_reproducible():
    dropout_reproducible("cpu", "cpu")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dropout_matches_explicit_mask(is_causal, dtype):
    dropout_matches_explicit_mask("cpu", _keep_mask, "cpu", dtype=dtype, is_causal=is_causal, L=70, S=83)


def test_dropout_one_drops_everything():
    dropout_all("cpu", "cpu")


def test_dropout_keep_mask_is_a_function_of_rng_state():
    state = torch.tensor([123, 456])
    a = _keep_mask(state, (2, 3, 17, 19), 0.4, "cpu")
    assert torch.equal(a, _keep_mask(state, (2, 3, 17, 19), 0.4, "cpu"))
    assert not torch.equal(a, _keep_mask(torch.tensor([123, 457]), (2, 3, 17, 19), 0.4, "cpu"))
    assert abs(a.float().mean().item() - 0.6) < 0.05
    assert _keep_mask(state, (1, 1, 4, 4), 0.0, "cpu").all()
    assert not _keep_mask(state, (1, 1, 4, 4), 1.0, "cpu").any()


# ----------------------------------------------------------------------------- lse, dispatch, boundary

def test_lse_is_natural_log_sum_exp():
    from fastformer.ops.attention import AttentionOptions
    from fastformer.ops.attention.cpu import cpu_forward

    q, k, v = (torch.randn(1, 2, n, 16) for n in (40, 50, 50))
    mask = torch.rand(40, 50) > 0.4
    mask[3] = False  # a dead row: lse -inf, output 0
    full = mask.expand(1, 2, 40, 50)
    out, lse = cpu_forward(q, k, v, full, None, AttentionOptions(0.0, False, False, 0.25))
    s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~full, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[..., 3]).all() and torch.equal(out[..., 3, :], torch.zeros(1, 2, 16))


def test_auto_picks_cpu_and_falls_back(monkeypatch):
    from fastformer.ops.attention import cpu as attention_cpu
    from fastformer.ops.attention.problem import validate_attention_inputs
    from fastformer.ops.attention.registry import select_backend

    monkeypatch.setattr(attention_cpu, "_AUTO_OVERRIDE", True)  # the policy table is tested below
    q = torch.randn(1, 2, 8, 16)
    assert select_backend(validate_attention_inputs(q, q, q)).name == "cpu"
    assert select_backend(validate_attention_inputs(q.bfloat16(), q.bfloat16(), q.bfloat16())).name == "cpu"
    for reason, problem in [
        ("dtype", validate_attention_inputs(q.half(), q.half(), q.half())),
        ("dtype", validate_attention_inputs(q.double(), q.double(), q.double())),
        ("head dim", validate_attention_inputs(*(torch.randn(1, 2, 8, 300) for _ in range(3)))),
    ]:
        assert select_backend(problem).name == "reference"
        with pytest.raises(ValueError, match=reason):
            select_backend(problem, "cpu")
    mask = torch.zeros(8, 8, requires_grad=True)
    assert select_backend(validate_attention_inputs(q, q, q, attn_mask=mask)).name == "reference"


def test_auto_policy_follows_the_table(monkeypatch):
    """auto runs the cpu kernels exactly on the classes the committed table marks "cpu" for
    this variant (nearest measured head dim and length), torch's SDPA elsewhere."""
    from fastformer.ops.attention import cpu as attention_cpu
    from fastformer.ops.attention.problem import validate_attention_inputs
    from fastformer.ops.attention.registry import select_backend

    variant = attention_cpu.isa()
    table = {variant: [("float32", "fwd", False, 64, 256, 0.9, "torch"), ("float32", "fwd", False, 64, 1024, 1.3, "cpu"),
                       ("bfloat16", "fwd_bwd", True, 128, 512, 2.0, "cpu")]}
    def use(policy):
        monkeypatch.setattr("fastformer.ops.attention_cpu_policy.POLICY", policy)
        attention_cpu._policy_classes.cache_clear()
        monkeypatch.setattr(attention_cpu, "_CLASSES_HERE", attention_cpu._policy_classes(variant))

    monkeypatch.setattr(attention_cpu, "_AUTO_OVERRIDE", None)
    use(table)
    try:
        def pick(L, E=64, dtype=torch.float32, causal=False, grad=False):
            q = torch.randn(1, 2, L, E, dtype=dtype, requires_grad=grad)
            return select_backend(validate_attention_inputs(q, q, q, is_causal=causal)).name

        assert pick(200) == "reference" and pick(400) == "reference"  # nearest measured: 256
        assert pick(600) == "cpu" and pick(3000) == "cpu" and pick(900, E=100) == "cpu"  # nearest: 1024
        assert pick(600, causal=True) == "reference"  # class never measured
        assert pick(512, E=128, dtype=torch.bfloat16, causal=True, grad=True) == "cpu"
        assert pick(512, E=128, dtype=torch.bfloat16, causal=True) == "reference"  # fwd only: not measured
        with torch.no_grad():  # no_grad makes it a forward-only problem
            assert pick(512, E=128, dtype=torch.bfloat16, causal=True, grad=True) == "reference"
        use({})
        assert pick(1024) == "reference"  # a variant never measured: torch everywhere
    finally:
        attention_cpu._policy_classes.cache_clear()


def test_auto_policy_table_matches_committed_results():
    """fastformer/ops/attention_cpu_policy.py is what bench/cpu_policy.py derives from bench/results."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "bench/cpu_policy.py", "--check"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_policy_merge_takes_torch_where_any_source_does(tmp_path, monkeypatch):
    """bench/cpu_policy.py merges a variant's native and emulated runs: a shape both measured is
    ``cpu`` only if each run's own verdict is, noise included (a higher ratio with more noise can
    be the one that says torch); shapes one run measured keep that run's verdict."""
    import importlib.util
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cpu_policy", os.path.join(root, "bench", "cpu_policy.py"))
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    monkeypatch.setattr(cp, "ROOT", tmp_path)

    def row(seqlen, speedup, auto_choice, auto_speedup):
        return {"dtype": "float32", "mode": "fwd", "causal": False, "head_dim": 64, "seqlen": seqlen,
                "speedup_vs_torch": speedup, "auto_choice": auto_choice, "auto_speedup_vs_torch": auto_speedup}

    runs = {  # native: 1.50 but noise 0.45 (torch); emulated: 1.20, no noise (cpu)
        "native": ({"isa": "avx2", "date": "2026-01-01"}, [row(256, 1.50, "reference", 1.45), row(512, 1.3, "cpu", 1.3)]),
        "emulated": ({"isa": "avx2", "date": "2026-01-02", "emulated_isa": "avx2"},
                     [row(256, 1.20, "cpu", 1.2), row(1024, 1.25, "cpu", 1.25)]),
    }
    for name, (env, rows) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpu_attention.json").write_text(json.dumps({"environment": env, "results": rows}))
    sources, merged = cp.load_runs(tmp_path)["avx2"]
    assert [s for s, _ in sources] == ["native/cpu_attention.json", "emulated/cpu_attention.json"]
    verdict = {r["seqlen"]: (r["speedup_vs_torch"], cp.choice(r)) for r in merged}
    assert verdict == {256: (1.20, "torch"), 512: (1.3, "cpu"), 1024: (1.25, "cpu")}


def test_outputs_aliasing_inputs_are_refused():
    """The kernels write out/lse (forward) and dq, dk, dv (backward) while they still read q, k, v
    and dO in place: an output sharing memory with an input raises instead of reading
    overwritten values."""
    require_backend("cpu")
    C = fastformer._ext.C
    q, k, v, dout = (torch.randn(1, 2, 16, 32) for _ in range(4))
    out, lse = torch.empty(1, 2, 16, 32), torch.empty(1, 2, 16)
    for fwd_out in (v, q):
        with pytest.raises(RuntimeError, match="out and lse must not share memory"):
            C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, False, False, 0.2, fwd_out, lse, -1, -1, None, 0.0)
    C.attention_cpu_forward(q, k, v, None, 0.0, 0, 0, False, False, 0.2, out, lse, -1, -1, None, 0.0)
    for dq, dk, dv in [(q, torch.empty_like(k), torch.empty_like(v)), (torch.empty_like(q), k, torch.empty_like(v)),
                       (torch.empty_like(q), torch.empty_like(k), dout[:, :, :, :].view_as(v))]:
        with pytest.raises(RuntimeError, match="must not share memory"):
            C.attention_cpu_backward(dout, q, k, v, out, lse, None, 0.0, 0, 0, False, False, 0.2, dq, dk, dv,
                                     -1, -1, None, 0.0)


def test_boundary_checks_name_the_argument():
    C = fastformer._ext.C
    q = torch.randn(1, 2, 8, 16)
    out, lse = torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8)
    args = (None, 0.0, 0, 0, False, False, 0.25)
    with pytest.raises(RuntimeError, match="k must be float32 or bfloat16"):
        C.attention_cpu_forward(q, q.double(), q, *args, out, lse)
    with pytest.raises(RuntimeError, match="v has dtype"):
        C.attention_cpu_forward(q, q, q.bfloat16(), *args, out, lse)
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        C.attention_cpu_forward(q[0], q, q, *args, out, lse)
    with pytest.raises(RuntimeError, match="lse must be"):
        C.attention_cpu_forward(q, q, q, *args, out, torch.empty(1, 2, 9))
    with pytest.raises(RuntimeError, match="mask must be"):
        C.attention_cpu_forward(q, q, q, torch.ones(8, 8, dtype=torch.bool), *args[1:], out, lse)
    with pytest.raises(RuntimeError, match="heads must be a multiple"):
        C.attention_cpu_forward(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), *args, out, lse)


_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
from attention_cases import CASES, Case, check_case
from fastformer.ops.attention.cpu import isa
assert isa() == sys.argv[1], (isa(), sys.argv[1])
torch.manual_seed(0)
for case in [c for c in CASES if c.id in ("basic", "causal_long", "gqa_mask", "dead_rows_float", "Ev!=E")] + [
        Case("E130", batch=(1,), hq=2, L=45, S=70, E=130),
        Case("odd_pairs", batch=(2,), hq=2, hkv=1, L=37, S=171, E=33, Ev=17, is_causal=True, bottom_right=True),
        Case("L200_mask", batch=(1,), hq=2, L=200, S=131, E=64, mask="float", mask_shape="B11S")]:
    for dtype in (torch.float32, torch.bfloat16):
        check_case(case, "cpu", dtype, "cpu")
print("ok")
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_isa_variants(variant):
    """Each kernel variant this processor can run (FASTFORMER_CPU_ISA forces one), in a fresh process.
    avx512_bf16 runs bf16 inputs on the bf16 dot-product kernels (vdpbf16ps)."""
    run_under_variant(variant, _ISA_SCRIPT)


def test_eager_paths_match_the_custom_op(monkeypatch):
    """Eager calls skip torch's custom-op dispatch (``fused._EagerAttention`` with gradients, the
    kernel itself without); traces keep the op. Outputs and gradients agree bit for bit, with
    dropout and a mask, and a second derivative raises instead of returning a wrong one."""
    from fastformer.ops.attention import fused

    require_backend("cpu")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 24, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 37, 37)
    dout = torch.randn(2, 3, 37, 24)

    def run():
        torch.manual_seed(1)  # the dropout seed
        out = fastformer.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2, backend="cpu")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    eager = run()
    with torch.no_grad():
        torch.manual_seed(1)
        eager_nograd = fastformer.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2, backend="cpu")
    monkeypatch.setattr(fused, "_eager", lambda *a: None)
    op = run()
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    assert torch.equal(eager_nograd, op[0])
    monkeypatch.undo()
    out = fastformer.scaled_dot_product_attention(q, k, v, backend="cpu")
    (dq,) = torch.autograd.grad(out, q, dout, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), q)


_IN_PLACE_B_SCRIPT = r"""
import sys, torch, fastformer
torch.manual_seed(0)
results = []
# (B, H, Hkv, L, S, d, layout, causal): layouts the fp32 kernels read in place as B operands
# (rows contiguous, d a multiple of the panel width) and ones they still pack (d = 40).
for B, H, Hkv, L, S, d, layout, causal in [
        (2, 3, 3, 70, 70, 64, "qkv", True), (1, 4, 4, 33, 50, 128, "contiguous", False),
        (2, 4, 2, 45, 45, 32, "gqa", True), (2, 2, 2, 40, 29, 64, "expanded_kv", False),
        (1, 2, 2, 37, 37, 40, "qkv", False)]:
    if layout == "qkv":  # views of one projection's output, as in nn.Attention
        leaves = [torch.randn(B, L, 3 * H * d, requires_grad=True)]
        q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in leaves[0].split([H * d] * 3, dim=-1))
    elif layout == "expanded_kv":  # batch stride 0
        leaves = [torch.randn(B, H, L, d, requires_grad=True), torch.randn(1, H, S, d, requires_grad=True),
                  torch.randn(1, H, S, d, requires_grad=True)]
        q, k, v = leaves[0], leaves[1].expand(B, H, S, d), leaves[2].expand(B, H, S, d)
    else:
        leaves = [torch.randn(B, H, L, d, requires_grad=True), torch.randn(B, Hkv, S, d, requires_grad=True),
                  torch.randn(B, Hkv, S, d, requires_grad=True)]
        q, k, v = leaves
    dout = torch.randn(B, L, H, d).transpose(1, 2)  # as it arrives in training
    out = fastformer.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H, backend="cpu")
    results += [out.detach(), *torch.autograd.grad(out, leaves, dout)]
torch.save(results, sys.argv[1])
print("ok")
"""


def test_in_place_b_operands_match_packed_ones(tmp_path):
    """fp32 K, V, Q and dO with contiguous rows a multiple of the panel width are read in place
    (no packing pass); every other layout is packed. Outputs and gradients must be bit-identical
    to the all-packed path (FASTFORMER_CPU_ATTN_PACK_B=1): same FMAs in the same order, only the
    addresses differ. Strided qkv views, GQA, expanded K/V and a transposed dO."""
    require_backend("cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {}
    for pack in ("0", "1"):
        path = tmp_path / f"pack{pack}.pt"
        env = dict(os.environ, FASTFORMER_CPU_ATTN_PACK_B=pack)
        res = subprocess.run([sys.executable, "-c", _IN_PLACE_B_SCRIPT, str(path)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
        outs[pack] = torch.load(path)
    assert len(outs["0"]) == len(outs["1"]) > 0
    for a, b in zip(outs["0"], outs["1"]):
        assert a.isfinite().all()
        assert torch.equal(a, b)
