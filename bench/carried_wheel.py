"""Use a prebuilt fastformer wheel carried to the GPU machine instead of building there.

bench/gpu_rehearsal.sh builds the GPU wheel (cp312, torch 2.11.0+cu130, sm_80 + sm_90a)
into .whl/ on a CPU machine; name ".whl" in the device tool's carry and bench/gpu.sh
spends no loan time compiling:

    python bench/carried_wheel.py find      # is there a wheel tagged for this Python? (prints it)
    python bench/carried_wheel.py check     # is there a wheel for this Python/torch that loads with CUDA?
    python bench/carried_wheel.py install   # check, then put its fastformer/_C*.so into the source tree
    python bench/carried_wheel.py stamp     # record this tree's extension-sources hash beside the wheel

A wheel fits only when its stamp (``<wheel>.sources``) matches the tree's csrc/ and setup.py,
so a wheel left over from older sources is rebuilt on the GPU instead of silently used.

``install`` leaves the rest to ``FASTFORMER_PREBUILT_EXT=1 pip install --no-build-isolation
--no-deps -e .`` (the Python side, editable, as a source build would be), so tests and
benchmarks import one fastformer: the checkout's. Exit status 1, with the reason on stderr,
when no wheel fits (gpu.sh then builds from source).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"

# Run in a fresh interpreter inside the unpacked wheel: the import itself is the test (an undefined
# symbol or a torch ABI mismatch fails here, not in the middle of the CUDA tests).
PROBE = r"""
import json, torch
import fastformer, fastformer._C as C
info = dict(getattr(C, "build_info", {}))
info.update(with_cuda=bool(C.with_cuda), file=C.__file__, running_torch=torch.__version__,
            running_cuda=torch.version.cuda)
print(json.dumps(info))
"""


def sources_hash(repo: Path = REPO) -> str:
    """sha256 over what the extension is compiled from (csrc/ and setup.py, paths and bytes)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in (repo / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files + [repo / "setup.py"]:
        h.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def stamp_path(wheel: Path) -> Path:
    return wheel.with_name(wheel.name + ".sources")


def find_wheel() -> Optional[Path]:
    """The newest .whl/fastformer-*.whl tagged for this interpreter and platform, or None."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    fits = [w for w in WHEEL_DIR.glob("fastformer-*.whl") if f"-{tag}-" in w.name and w.name.endswith(f"{platform}.whl")]
    return max(fits, key=lambda w: w.stat().st_mtime) if fits else None


def check(wheel: Path, unpacked: Path) -> dict:
    """Unpack ``wheel`` and load its extension; the build facts, or RuntimeError saying why it does not fit.

    A wheel fits only if it was built from this tree's extension sources: its stamp
    (``<wheel>.sources``, written by ``bench/gpu_rehearsal.sh``) must equal :func:`sources_hash`
    here, otherwise a stale binary would run against newer Python bindings."""
    stamp = stamp_path(wheel)
    if not stamp.exists():
        raise RuntimeError(f"{wheel.name} has no sources stamp ({stamp.name}): rebuild it with "
                           "bash bench/gpu_rehearsal.sh --no-tests")
    if stamp.read_text().strip() != sources_hash():
        raise RuntimeError(f"{wheel.name} was built from other extension sources than this tree's csrc/ and "
                           "setup.py: rebuild it with bash bench/gpu_rehearsal.sh --no-tests")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    env = dict(os.environ, PYTHONPATH=str(unpacked), PYTHONSAFEPATH="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=unpacked, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{wheel.name} does not load here:\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(info["file"]).resolve().is_relative_to(unpacked.resolve()):
        raise RuntimeError(f"the probe imported {info['file']}, not the wheel's extension")
    if not info["with_cuda"]:
        raise RuntimeError(f"{wheel.name} was built without CUDA kernels")
    running = info["running_torch"].split("+")[0]
    if info.get("torch") != running:
        raise RuntimeError(f"{wheel.name} was built against torch {info.get('torch')}, this is torch {running}")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["find", "check", "install", "stamp"])
    args = p.parse_args(argv)
    wheel = find_wheel()
    if wheel is None:
        print(f"no fastformer wheel for cp{sys.version_info.major}{sys.version_info.minor} in {WHEEL_DIR}",
              file=sys.stderr)
        return 1
    if args.action == "find":
        print(wheel)
        return 0
    if args.action == "stamp":  # bench/gpu_rehearsal.sh, right after building the wheel from this tree
        stamp_path(wheel).write_text(sources_hash() + "\n")
        print(f"stamped {wheel.name} with the extension sources' hash")
        return 0
    with tempfile.TemporaryDirectory(prefix="fastformer-wheel-") as tmp:
        try:
            info = check(wheel, Path(tmp))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"carried wheel {wheel.name}: _C with CUDA for {', '.join(info.get('cuda_archs', []))} "
              f"({info.get('cuda_toolkit')}), torch {info.get('torch')}")
        if args.action == "install":
            built = Path(info["file"])
            target = REPO / "fastformer" / built.name
            shutil.copy2(built, target)
            print(f"installed {target.relative_to(REPO)} from the wheel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
