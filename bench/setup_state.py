"""What bench/setup_env.sh still has to do in this environment, decided in one
quick Python start (nothing heavy is imported: torch is looked up, not loaded).

    python bench/setup_state.py check <venv>   # prints "need <requirement>" lines and "build fresh|stale <why>"
    python bench/setup_state.py stamp <venv>   # after a successful build: record what it was built from

The build stamp (``<venv>/fastformer-build/stamp.json``) holds a hash of every
input the compiled extension depends on: the C++/CUDA sources, setup.py,
pyproject.toml's [build-system] table, torch's version file (version, CUDA and git revision), the
Python version and the build switches (FASTFORMER_NO_CUDA, CUDA_HOME, nvcc,
TORCH_CUDA_ARCH_LIST). If any of them changes, or the extension file that build
produced was replaced or removed (another environment building in the same
checkout, say), the extension is rebuilt; otherwise set-up skips pip entirely.
Python sources need no rebuild: the install is editable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent

# module -> requirement installed when the module is missing
TOOLS = {
    "pytest": "pytest",
    "pytest_benchmark": "pytest-benchmark",
    "hypothesis": "hypothesis",
    "ninja": "ninja",
    "pybind11": "pybind11",
    "tqdm": "tqdm",
    "transformers": "transformers",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
}


def build_dir(venv: Path) -> Path:
    """Where the extension's object files and the stamp persist between builds."""
    return venv / "fastformer-build"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(has_gpu: bool) -> List[str]:
    """Requirements to pip-install (torch is handled by setup_env.sh itself)."""
    need = []
    if importlib.util.find_spec("triton") is None:
        need.append("triton==3.6.0")
    need += [req for mod, req in TOOLS.items() if importlib.util.find_spec(mod) is None]
    numpy = _version("numpy")
    if not has_gpu and (numpy is None or tuple(int(x) for x in numpy.split(".")[:2]) >= (2, 4)):
        need.append("numpy<2.4")  # triton 3.6's CPU interpreter breaks on numpy 2.4
    # setuptools older than 70.1 builds wheels (pip's editable install too) only with `wheel`
    setuptools = _version("setuptools")
    if setuptools is not None and tuple(int(x) for x in setuptools.split(".")[:2]) < (70, 1) \
            and importlib.util.find_spec("wheel") is None:
        need.append("wheel")
    return need


def _extension_file() -> Optional[Path]:
    import sysconfig

    path = REPO / "fastformer" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    return path if path.exists() else None


def torch_identity() -> str:
    """torch's version.py (version, CUDA version, git revision), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    path = Path(spec.origin).parent / "version.py" if spec and spec.origin else None
    return path.read_text() if path and path.exists() else "<no torch>"


def _build_system(pyproject: Path) -> str:
    """pyproject.toml's [build-system] table (its pytest settings do not touch the build)."""
    if not pyproject.exists():
        return "<missing>"
    text = pyproject.read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the whole file
        return text
    return json.dumps(tomllib.loads(text).get("build-system"), sort_keys=True)


def build_inputs() -> Dict[str, str]:
    """Everything the compiled extension is built from, hashed (see the module docstring)."""
    h = hashlib.sha256()
    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.is_file())
    files += [REPO / "setup.py"]
    for path in files:
        h.update(str(path.relative_to(REPO)).encode() + b"\0")
        h.update(path.read_bytes() if path.exists() else b"<missing>")
        h.update(b"\0")
    h.update(_build_system(REPO / "pyproject.toml").encode())
    switches = {k: os.environ.get(k, "") for k in ("FASTFORMER_NO_CUDA", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    switches["nvcc"] = shutil.which("nvcc") or ""
    return {
        "sources": h.hexdigest(),
        "torch": hashlib.sha256(torch_identity().encode()).hexdigest(),
        "python": sys.version,
        "switches": json.dumps(switches, sort_keys=True),
    }


def _ext_identity(path: Optional[Path]) -> Optional[List[int]]:
    if path is None:
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def build_state(venv: Path) -> str:
    """'fresh' or 'stale <reason>'."""
    spec = importlib.util.find_spec("fastformer")
    if spec is None or spec.origin is None:
        return "stale fastformer is not installed in this environment"
    if Path(spec.origin).resolve().parent != REPO / "fastformer":
        return f"stale fastformer is installed from {Path(spec.origin).parent}, not this checkout"
    return stamp_state(venv)


def stamp_state(venv: Path) -> str:
    """'fresh' if the build stamp matches the current build inputs and extension file, else 'stale <reason>'."""
    stamp_file = build_dir(venv) / "stamp.json"
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return "stale no build stamp yet (first build in this environment)"
    now = build_inputs()
    changed = [k for k in now if stamp.get("inputs", {}).get(k) != now[k]]
    if changed:
        what = {"sources": "C++/CUDA sources, setup.py or pyproject's [build-system]", "torch": "torch version",
                "python": "Python version", "switches": "build switches"}
        return "stale changed since the last build: " + ", ".join(what[k] for k in changed)
    ext = _extension_file()
    if stamp.get("extension") != _ext_identity(ext):
        return "stale the compiled extension was removed or replaced since the last build"
    if ext is None and os.environ.get("FASTFORMER_REQUIRE_EXT") == "1":
        return "stale the compiled extension is missing (FASTFORMER_REQUIRE_EXT=1)"
    return "fresh"


def write_stamp(venv: Path) -> None:
    out = build_dir(venv)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"inputs": build_inputs(), "extension": _ext_identity(_extension_file())}
    (out / "stamp.json").write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "stamp"):
        print(__doc__, file=sys.stderr)
        return 2
    venv = Path(argv[1])
    if argv[0] == "stamp":
        write_stamp(venv)
        return 0
    for req in missing_requirements(has_gpu=os.environ.get("FASTFORMER_HAS_GPU") == "1"):
        print(f"need {req}")
    print(f"build {build_state(venv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
