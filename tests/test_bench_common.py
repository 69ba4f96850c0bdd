"""bench/common.py's reporting rules: quick runs print no ceilings, repeats that
disagree beyond the machine's noise are flagged, and a run's last line says where
its results went (and whether git tracks them)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import attention  # noqa: E402
import common  # noqa: E402


def test_timing_spread_is_relative_interquartile_range():
    t = common._timing([1.0, 1.0, 1.0, 1.0, 1.0])
    assert (t.median_s, t.spread, t.reps) == (1.0, 0.0, 5)
    t = common._timing([0.9, 1.0, 1.0, 1.1, 5.0])  # one stall does not move the quartiles much
    assert t.median_s == 1.0 and t.spread == pytest.approx(0.1)  # quartiles 1.0 and 1.1
    t = common._timing([1.0, 3.0])  # too few for quartiles: the full range
    assert t.spread == pytest.approx(1.0)


@pytest.mark.parametrize("spread, noise, noisy", [
    (0.05, 0.0, False),   # under the 10 % floor
    (0.15, 0.0, True),
    (0.15, 0.1, False),   # within twice a loaded machine's noise
    (0.25, 0.1, True),
])
def test_is_noisy(spread, noise, noisy):
    assert common.is_noisy(spread, noise) is noisy


def test_quick_runs_measure_no_ceilings():
    values, spreads = common.measure_ceilings("cpu", quick=True)
    assert values == {} and spreads == {}
    assert "full runs only" in common.describe_ceilings(values, spreads, 0.05)


def test_ceiling_line_flags_unstable_rounds():
    line = common.describe_ceilings({"matmul_float32_TFLOPs": 0.065, "copy_GBps": 10.0},
                                    {"matmul_float32_TFLOPs": 0.5, "copy_GBps": 0.02}, noise=0.05)
    assert "matmul_float32_TFLOPs 0.065 (rounds within 50%, UNSTABLE)" in line
    assert "copy_GBps 10 (rounds within 2%)" in line


def test_roof_is_best_round_with_spread(monkeypatch):
    medians = iter([2.0, 1.0, 4.0])
    monkeypatch.setattr(common, "time_stats", lambda fn, device, quick=False: common.Timing(next(medians), 0.0, 5))
    rate, spread = common._roof(lambda: None, work=8.0, device="cpu")
    assert rate == 8.0 and spread == pytest.approx(0.75)


def test_noisy_row_is_marked():
    row = {"provider": "ff-cpu", "time_ms": 1.0, "tflops": 1e-3, "peak_bytes": 0, "max_error": 1e-7,
           "spread": 0.8, "noisy": True}
    assert "NOISY (repeats spread 80%)" in attention.format_row(row, "cpu")
    del row["noisy"]
    assert "NOISY" not in attention.format_row(row, "cpu")


def test_where_results_went():
    tracked = next((REPO / "bench" / "results").glob("*/attention.json"))
    assert common.where_results_went(tracked) == f"results in {tracked.relative_to(REPO)}"
    quick = REPO / "bench" / "results" / "some-device" / "attention-quick.json"
    assert "ignored by git" in common.where_results_went(quick)
    new = REPO / "bench" / "results" / "a-new-device" / "attention.json"
    msg = common.where_results_went(new)
    assert "bench/results/a-new-device/attention.json" in msg and "git add bench/results/a-new-device" in msg
