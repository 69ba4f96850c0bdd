"""Run the pytest-benchmark micro-benchmarks (bench/test_bench_*.py) and keep their JSON
next to the other results, as ``<results>/<device>/pytest-benchmark.json``.

    python bench/bench_pytest.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="one shape per benchmark, few rounds")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    out = common.results_dir(common.environment(device)) / ("pytest-benchmark" + ("-quick" if args.quick else "") + ".json")
    cmd = [sys.executable, "-m", "pytest", str(common.BENCH_DIR), "--benchmark-only", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}", "--benchmark-group-by=group"]
    if args.quick:
        cmd += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=2", "-k", "B1H8L512d64 or B16H16L1024d64"]
    rc = subprocess.run(cmd).returncode
    print(f"# wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
