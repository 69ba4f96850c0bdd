"""The benchmark plumbing works on a CPU: bench/gpu.sh --dry-run runs every step's
stand-in (info, GPU-test collection, every benchmark's --quick set), its results
archive holds valid JSON, and bench/report.py renders that JSON."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_and_report(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # benchmarks run real backends, not the interpreter
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    # First line: where the extension came from and whether fastformer._C has its CUDA kernels.
    first = summary.splitlines()[0]
    assert first.startswith("extension: ") and "fastformer._C with CUDA: " in first, first
    steps = ["environment", "cuda tests (collect only)", "benchmarks (cpu, quick)"]
    tag = f"-cp{sys.version_info.major}{sys.version_info.minor}-"
    if any(tag in w.name for w in (REPO / ".whl").glob("fastformer-*.whl")):  # bench/gpu_rehearsal.sh built one
        steps.append("carried wheel (check)")
    for step in steps:
        line = next(l for l in summary.splitlines() if l.startswith(step))
        assert " ok " in line, f"step failed: {line}\n{(tmp_path / 'gpu_log.txt').read_text()[-4000:]}"

    extract = tmp_path / "extract"
    with tarfile.open(tmp_path / "results.tgz") as tar:
        tar.extractall(extract, filter="data")
    jsons = list(extract.glob("results/*/*.json"))
    assert any(p.name == "attention-quick.json" for p in jsons)
    for path in jsons:
        data = json.loads(path.read_text())
        if path.name.startswith("pytest-benchmark"):  # pytest-benchmark's own schema
            assert data["benchmarks"], f"{path.name}: no benchmarks"
            continue
        env_ = data["environment"]
        for key in ("device", "torch", "triton", "commit", "date", "cpu_flags"):
            assert key in env_, f"{path.name}: environment lacks {key}"
        assert isinstance(data["results"], list)
        assert data["results"] or data.get("skipped"), f"{path.name}: no results and no reason for skipping"

    folder = next(p for p in jsons if p.name == "attention-quick.json").parent
    out = subprocess.run([sys.executable, "bench/report.py", str(folder)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = (folder / "report.md").read_text()
    assert "| provider |" in report and "ff-naive" in report
    assert (folder / "attention_throughput.png").stat().st_size > 1000
