"""Property-based fuzzing: random valid shapes, masks (with -inf or large finite fills),
causal flags, GQA ratios, dtypes (float16 with large magnitudes) and backends, each
checked by the error rule against the float64 reference.

Profiles: the default ("ci") draws a few dozen cases and runs in well under a
minute on CPU (reference, naive, cpu and — through the interpreter — triton);
FASTFORMER_FUZZ_PROFILE=gpu draws hundreds, on CUDA tensors (bench/gpu.sh).
Any failure hypothesis finds becomes a regular case in attention_cases.CASES.
"""

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastformer
from attention_cases import Case, check_case

PROFILE = os.environ.get("FASTFORMER_FUZZ_PROFILE", "ci")
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("gpu", max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(PROFILE)

ON_GPU = PROFILE == "gpu" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# (backend, dtype) pairs worth fuzzing on this device; unavailable backends are dropped.
CANDIDATES = (
    [("triton", torch.bfloat16), ("triton", torch.float16), ("cuda", torch.bfloat16), ("reference", torch.float16)]
    if ON_GPU
    else [("reference", torch.float32), ("naive", torch.float32), ("naive", torch.float16), ("cpu", torch.float32),
          ("cpu", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16)]
)
AVAILABLE = [(b, d) for b, d in CANDIDATES if fastformer.backends()[b]["available"]]


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    S = draw(st.integers(1, 40))
    E = draw(st.sampled_from([1, 3, 8, 16, 24, 40, 64]))
    Ev = draw(st.sampled_from([E, 8, 20]))
    mask = draw(st.sampled_from([None, "bool", "float"]))
    causal = mask is None and draw(st.booleans())
    # Float masks: masked keys get -inf or a large finite fill (Hugging Face's finfo.min padding).
    fill = draw(st.sampled_from([None, torch.finfo(torch.float32).min, -1e30, -3e38])) if mask == "float" else None
    return Case(
        id="fuzz",
        batch=draw(st.sampled_from([(1,), (2,), ()])),
        hq=hq, hkv=hkv, L=L, S=S, E=E, Ev=Ev,
        mask=mask,
        mask_shape=draw(st.sampled_from(["LS", "11LS", "B11S", "BHLS"])),
        is_causal=causal,
        bottom_right=causal and draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.05, 1.0])),
        dead_rows=mask is not None and L > 1 and draw(st.booleans()),
        fill=fill,
    )


@pytest.mark.skipif(not AVAILABLE, reason="no backend to fuzz")
@given(case=cases(), pick=st.integers(0, 10**6), magnitude=st.sampled_from([1.0, 1.0, 8.0, 40.0]))
def test_fuzz_attention(case, pick, magnitude):
    backend, dtype = AVAILABLE[pick % len(AVAILABLE)]
    if dtype == torch.float16:
        # float16 inputs of large magnitude: q·kᵀ passes 65504 (torch's scores stay finite).
        case = dataclasses.replace(case, magnitude=magnitude)
    check_case(case, backend, dtype, DEVICE)


@st.composite
def variant_cases(draw):
    """Cases with a window, ALiBi and/or a soft-cap (at least one), on top of the plain draws."""
    case = draw(cases())
    side = st.sampled_from([-1, 0, 1, 2, 5, 17])
    window = (draw(side), draw(side))
    alibi = draw(st.sampled_from([None, "H", "BH"]))
    softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 2.0, 30.0]))
    if window == (-1, -1) and alibi is None and softcap == 0.0:
        window = (draw(st.integers(0, 4)), -1)
    if alibi == "BH" and not case.batch:
        alibi = "H"  # 3-D inputs have no batch for (B, Hq) slopes
    return dataclasses.replace(case, window=window, alibi=alibi, softcap=softcap, id="fuzz_variant")


# The "cuda" backend refuses the variants (a forced backend raises): fuzz the others.
VARIANT_BACKENDS = [(b, d) for b, d in AVAILABLE if b != "cuda"]


@pytest.mark.skipif(not VARIANT_BACKENDS, reason="no backend to fuzz")
@settings(max_examples=40 if PROFILE == "ci" else 400)
@given(case=variant_cases(), pick=st.integers(0, 10**6), magnitude=st.sampled_from([1.0, 1.0, 8.0]))
def test_fuzz_attention_variants(case, pick, magnitude):
    """Window / ALiBi / soft-cap draws, with everything the plain fuzz draws (masks with finite
    fills, dead rows, causal in both alignments, GQA, odd head dims, L or S = 1)."""
    backend, dtype = VARIANT_BACKENDS[pick % len(VARIANT_BACKENDS)]
    if dtype == torch.float16:
        case = dataclasses.replace(case, magnitude=magnitude)
    check_case(case, backend, dtype, DEVICE)
