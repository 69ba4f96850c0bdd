"""The attention feature matrix shared by every backend's tests.

Each case is small enough for the Triton interpreter (<= 128 tokens). A case
builds fresh random inputs, runs the backend under test, PyTorch in the same
dtype, and PyTorch in float64 on the upcast inputs, and applies the error
rule to the output and to the gradients of q, k, v (and of a float mask where
the backend supports mask gradients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastformer
from error_rule import assert_close_by_rule
from variant_reference import reference_attention, visible


@dataclass(frozen=True)
class Case:
    id: str
    batch: Tuple[int, ...] = (2,)  # leading dims before heads; () means 3-D input (H, L, E)
    hq: int = 3
    hkv: Optional[int] = None
    L: int = 17
    S: Optional[int] = None
    E: int = 16
    Ev: Optional[int] = None
    mask: Optional[str] = None  # "bool" / "float"
    mask_shape: str = "LS"  # LS, 11LS, B11S, BHLS
    is_causal: bool = False
    bottom_right: bool = False
    scale: Optional[float] = None
    dead_rows: bool = False  # some query rows have every key masked
    fill: Optional[float] = None  # float masks: masked keys get this finite fill (e.g. finfo.min), not -inf
    magnitude: float = 1.0  # q and k drawn with this standard deviation (large logits)
    window: Tuple[int, int] = (-1, -1)  # window_size (left, right); -1 = unlimited
    alibi: Optional[str] = None  # None / "H" / "BH": alibi_slopes of shape (Hq,) / (*batch, Hq)
    softcap: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gqa(self) -> bool:
        return self.hkv is not None and self.hkv != self.hq

    @property
    def variant(self) -> bool:
        """Uses a window, ALiBi or a soft-cap (checked against the explicit reference)."""
        return self.window != (-1, -1) or self.alibi is not None or self.softcap > 0.0


CASES = [
    Case("basic"),
    Case("3d_input", batch=()),
    Case("one_token", L=1, S=1),
    Case("cross_Lq<Lk", L=13, S=29),
    Case("cross_Lq>Lk", L=37, S=11),
    Case("Ev!=E", E=24, Ev=8),
    Case("head_dim_40", E=40, L=20),
    Case("head_dim_5", E=5, Ev=7, L=9, S=12),
    Case("scale", scale=0.37),
    Case("causal", is_causal=True),
    Case("causal_Lq<Lk", is_causal=True, L=9, S=23),
    Case("causal_Lq>Lk", is_causal=True, L=23, S=9),
    Case("causal_bottom_right", is_causal=True, bottom_right=True, L=9, S=23),
    Case("causal_long", is_causal=True, L=70, S=70, batch=(1,), hq=2),
    Case("bool_mask_LS", mask="bool", mask_shape="LS", L=19, S=21),
    Case("bool_mask_11LS", mask="bool", mask_shape="11LS"),
    Case("bool_mask_B11S", mask="bool", mask_shape="B11S", L=15, S=33),
    Case("bool_mask_BHLS", mask="bool", mask_shape="BHLS"),
    Case("float_mask_LS", mask="float", mask_shape="LS"),
    Case("float_mask_B11S", mask="float", mask_shape="B11S", S=26),
    Case("float_mask_BHLS", mask="float", mask_shape="BHLS"),
    Case("dead_rows_bool", mask="bool", mask_shape="BHLS", dead_rows=True),
    Case("dead_rows_float", mask="float", mask_shape="LS", dead_rows=True),
    Case("gqa", hq=4, hkv=2),
    Case("mqa_causal", hq=4, hkv=1, is_causal=True),
    Case("gqa_mask", hq=6, hkv=3, mask="bool", mask_shape="B11S"),
    Case("5d_input", batch=(2, 2), hq=2, L=11),
]

# Attention variants (issue 18): window, ALiBi, soft-cap, alone and combined with causal
# (both alignments), masks, GQA and odd shapes; small, as the interpreter runs them all.
VARIANT_CASES = [
    Case("window_causal", is_causal=True, window=(5, -1), L=40, S=40, batch=(1,)),
    Case("window_causal_br", is_causal=True, bottom_right=True, window=(6, -1), L=21, S=45, batch=(1,)),
    Case("window_sym", window=(4, 4), L=37, S=37, batch=(1,)),
    Case("window_right_only", window=(-1, 3), L=30, S=22, batch=(1,)),
    Case("window_br_Lq>Lk", window=(3, 2), bottom_right=True, L=33, S=15, batch=(1,)),
    Case("window_zero", window=(0, 0), L=19, S=19),  # one key per row: dS must be exactly 0
    Case("window_one_token", window=(2, 0), is_causal=True, L=1, S=1),
    Case("window_long", is_causal=True, window=(20, -1), L=90, S=90, batch=(1,), hq=2),
    Case("alibi_H", alibi="H", L=19, S=27),
    Case("alibi_BH_causal", alibi="BH", is_causal=True, L=23),
    Case("softcap", softcap=2.0, L=21, S=26),
    Case("softcap_causal_gqa", softcap=1.5, is_causal=True, hq=4, hkv=2),
    # Scores mostly beyond the cap (|score / softcap| up to ~10): tanh near +-1, where its
    # derivative 1 - tanh^2 loses its digits unless computed without cancellation.
    Case("softcap_saturated", softcap=0.5, scale=0.6, L=37, S=45),
    Case("window_alibi_softcap", window=(7, 0), alibi="H", softcap=3.0, L=41, S=41, batch=(1,)),
    Case("variants_float_mask", window=(6, 2), alibi="BH", softcap=2.5, mask="float", mask_shape="B11S", L=25),
    Case("variants_bool_mask_gqa", window=(5, 5), softcap=4.0, mask="bool", mask_shape="BHLS", hq=4, hkv=2),
    Case("variants_dead_rows", window=(2, 2), alibi="H", mask="bool", mask_shape="BHLS", dead_rows=True),
    Case("variants_3d", batch=(), window=(3, -1), alibi="H", softcap=1.0),
    Case("variants_5d", batch=(2, 2), hq=2, L=11, window=(2, 1), alibi="BH", softcap=2.0),
]


def _mask_shape(case: Case, B: int) -> tuple:
    L, S = case.L, case.S or case.L
    return {"LS": (L, S), "11LS": (1, 1, L, S), "B11S": (B, 1, 1, S), "BHLS": (B, case.hq, L, S)}[case.mask_shape]


def make_inputs(case: Case, dtype: torch.dtype, device, requires_grad: bool = True):
    """q, k, v and mask in ``dtype`` (drawn in float64 so the upcast is exact)."""
    S, Ev, hkv = case.S or case.L, case.Ev or case.E, case.hkv or case.hq
    lead = case.batch
    q = torch.randn(*lead, case.hq, case.L, case.E, dtype=torch.float64) * case.magnitude
    k = torch.randn(*lead, hkv, S, case.E, dtype=torch.float64) * case.magnitude
    v = torch.randn(*lead, hkv, S, Ev, dtype=torch.float64)
    mask = None
    if case.mask is not None:
        B = lead[0] if lead else 1
        shape = _mask_shape(case, B)
        if case.mask_shape in ("BHLS", "B11S") and len(lead) == 0:
            shape = shape[1:]
        shape = shape[max(0, len(shape) - (len(lead) + 3)):]  # no more dims than the weights (torch raises)
        keep = torch.rand(shape) > 0.3
        keep[..., 0] = True  # at least one visible key per row unless a dead row is asked for
        if case.dead_rows and keep.shape[-2] > 1:  # a (B, 1, 1, S) mask has no row 1 to hide
            keep[..., 1, :] = False
        if case.mask == "bool":
            mask = keep
        else:
            mask = torch.randn(shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
            if case.fill is not None:  # a finite fill, as Hugging Face models build padding masks
                mask = mask.float().masked_fill(~keep, case.fill)
    tensors = [t.to(dtype).to(device) for t in (q, k, v)]
    if mask is not None:
        # A finite fill stays float32 (torch adds a float32 mask in float32 whatever q's dtype).
        mask_dtype = torch.float32 if case.fill is not None else dtype
        mask = mask.to(device) if mask.dtype == torch.bool else mask.to(mask_dtype).to(device)
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return (*tensors, mask)


def make_slopes(case: Case, device):
    """ALiBi slopes for ``case`` (float32, as the API requires), or None."""
    if case.alibi is None:
        return None
    shape = (case.hq,) if case.alibi == "H" else (*case.batch, case.hq)
    return (torch.rand(shape, dtype=torch.float32) * 0.5 + 0.02).to(device)


def _flat4(t):
    """(..., H, N, D) -> (B, H, N, D) (the reference works on 4-D tensors)."""
    return t.reshape(-1, *t.shape[-3:]) if t.dim() >= 3 else t.reshape(1, 1, *t.shape)


def variant_attention(case: Case, q, k, v, mask, slopes):
    """The explicit mask/bias reference (tests/variant_reference.py) in the tensors' dtype, shaped like q."""
    q4, k4, v4 = _flat4(q), _flat4(k), _flat4(v)
    m4 = None
    if mask is not None:
        full = (*q.shape[:-1], k.shape[-2])
        m4 = mask.expand(full).reshape(q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2])
    if slopes is not None:
        slopes = slopes.reshape(-1, slopes.shape[-1]) if slopes.dim() > 1 else slopes[None].expand(q4.shape[0], -1)
    out, _ = reference_attention(q4, k4, v4, attn_mask=m4, is_causal=case.is_causal, bottom_right=case.bottom_right,
                                 scale=case.scale, window=case.window, alibi_slopes=slopes, softcap=case.softcap)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def torch_attention(case: Case, q, k, v, mask, slopes=None):
    """PyTorch's SDPA on the given tensors (bottom-right causal as an explicit mask); for the
    variants, the explicit-mask/bias reference in the same dtype."""
    if case.variant:
        return variant_attention(case, q, k, v, mask, slopes)
    is_causal = case.is_causal
    if case.bottom_right and case.is_causal:
        L, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=case.scale, enable_gqa=case.gqa
    )


def _upcast(t):
    if t is None:
        return None
    u = t.detach().double() if t.is_floating_point() else t.detach()
    return u.requires_grad_(t.requires_grad)


def check_case(case: Case, backend: str, dtype: torch.dtype, device, grads: bool = True, mask_grad: bool = False):
    """Run ``case`` on ``backend`` and assert the error rule on output and gradients."""
    q, k, v, mask = make_inputs(case, dtype, device, requires_grad=grads)
    slopes = make_slopes(case, device)
    if mask_grad and mask is not None and mask.is_floating_point():
        mask.requires_grad_(True)
    variant = dict(window_size=case.window, alibi_slopes=slopes, softcap=case.softcap) if case.variant else {}
    ours = fastformer.attention(
        q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=case.scale, enable_gqa=case.gqa,
        causal_bottom_right=case.bottom_right, backend=backend, **variant,
    )
    same = torch_attention(case, *[_upcast(t).to(dtype) if t is not None and t.is_floating_point() else t
                                   for t in (q, k, v)], _same_mask(mask, dtype), slopes)
    ref_inputs = [_upcast(t) for t in (q, k, v, mask)]
    with sdpa_kernel(SDPBackend.MATH):  # torch's CPU flash backward is wrong in all-fill rows
        ref = torch_attention(case, *ref_inputs, slopes)
    assert_close_by_rule(ours, ref, same, name=f"{backend}/{case.id}/out")
    if not grads:
        return
    dout = torch.randn_like(ref)
    if case.fill is not None:
        # Rows whose every visible key has the huge fill: the fused backends' backward (as torch's
        # CPU flash kernel) recomputes weights from an lse that cannot hold log(S) next to the
        # fill, giving S times the math path's gradients there. Such rows are padding in
        # practice, where the output gradient is 0. (With a window, any row can be one.)
        L, S = q.shape[-2], k.shape[-2]
        seen = visible(L, S, case.is_causal, case.bottom_right, case.window).to(mask.device)
        fill = torch.tensor(case.fill, dtype=mask.dtype, device=mask.device)
        all_filled = ~((mask.detach() != fill) & seen).any(-1)  # mask's shape without S
        dout = dout.masked_fill(all_filled.expand(dout.shape[:-1])[..., None], 0.0)
    diff_ours = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    g_ours = torch.autograd.grad(ours, diff_ours, dout.to(dtype))
    diff_ref = [t for t in ref_inputs if t is not None and t.requires_grad]
    g_ref = torch.autograd.grad(ref, diff_ref, dout)
    same_inputs = [_upcast(t).to(dtype).requires_grad_(True) for t in (q, k, v)]
    same_mask = _same_mask(mask, dtype)
    if same_mask is not None and mask.requires_grad:
        same_mask.requires_grad_(True)
    same = torch_attention(case, *same_inputs, same_mask, slopes)
    diff_same = same_inputs + ([same_mask] if same_mask is not None and same_mask.requires_grad else [])
    g_same = torch.autograd.grad(same, diff_same, dout.to(dtype))
    for name, a, r, s in zip(("dq", "dk", "dv", "dmask"), g_ours, g_ref, g_same):
        assert_close_by_rule(a, r, s, name=f"{backend}/{case.id}/{name}")


def _same_mask(mask, dtype):
    if mask is None:
        return None
    if mask.dtype in (torch.bool, torch.float32):  # torch takes both with any q dtype
        return mask.detach().clone()
    return mask.detach().to(dtype).clone()


def require_backend(name: str) -> None:
    """Skip when ``name`` is unavailable, unless FASTFORMER_EXPECT_BACKENDS lists it (then fail)."""
    info = fastformer.backends()[name]
    if info["available"]:
        return
    expected = [b for b in os.environ.get("FASTFORMER_EXPECT_BACKENDS", "").split(",") if b]
    if name in expected:
        pytest.fail(f"backend {name!r} expected (FASTFORMER_EXPECT_BACKENDS) but unavailable: {info['reason']}")
    pytest.skip(f"backend {name!r} unavailable: {info['reason']}")
