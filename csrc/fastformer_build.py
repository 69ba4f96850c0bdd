"""How ``fastformer._C`` is built: sources, our compiler flags, the CUDA toolkit,
and the exact command lines torch's ``BuildExtension`` derives from them.

One place for everything that compiles csrc/:

* setup.py builds the extension from :func:`extension`;
* tests/test_cuda_compile.py and bench/cuda_resources.py compile the CUDA
  sources with :func:`torch_compile_flags`, i.e. the flags ``BuildExtension``
  really passes (torch's ``COMMON_NVCC_FLAGS`` such as
  ``-D__CUDA_NO_HALF_CONVERSIONS__``, the ABI/extension-name defines, include
  paths, ours), captured from torch itself rather than copied, so a construct
  those flags forbid fails CI instead of the GPU machine's build.

Not part of the installed package: callers put csrc/ on ``sys.path`` and
``import fastformer_build``. Needs torch and setuptools.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"

# Architectures the CUDA kernels are compiled for (A100: sm_80; H100/H200: sm_90a, which the
# sm_90a-only instructions need). fastformer.info reports them from the built extension.
CUDA_ARCHS = ("sm_80", "sm_90a")
CUDA_ARCH_FLAGS = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in CUDA_ARCHS]
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unused-function"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *CUDA_ARCH_FLAGS]
LINK_FLAGS = ["-fopenmp"]

FIX_HINT = (
    "set CUDA_HOME to the CUDA toolkit root (the folder holding bin/nvcc, include/cuda_runtime.h and "
    "lib64/libcudart.so, e.g. CUDA_HOME=/usr/local/cuda-13.0), or FASTFORMER_NO_CUDA=1 to build the CPU "
    "kernels only"
)


class ToolkitError(RuntimeError):
    """A CUDA toolkit was named or found but cannot build the extension; the message names the fix."""


@dataclass(frozen=True)
class CudaToolkit:
    root: str     # toolkit root: bin/nvcc, include/, lib64/ (what torch calls CUDA_HOME)
    nvcc: str     # the real nvcc under root (not a wrapper on PATH)
    release: str  # "13.0"
    build: str    # "V13.0.88"
    found_by: str  # how the root was found, for the build log

    def describe(self) -> str:
        return f"CUDA {self.release} ({self.build}) at {self.root}"


def _nvcc_version(nvcc: str) -> tuple:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolkitError(f"cannot run {nvcc} --version ({exc}); {FIX_HINT}") from exc
    m = re.search(r"release (\d+\.\d+), (V[\d.]+)", out)
    if not m:
        raise ToolkitError(f"{nvcc} --version printed no CUDA release:\n{out}\n{FIX_HINT}")
    return m.group(1), m.group(2)


def _root_from_nvcc(nvcc: str) -> Optional[str]:
    """The toolkit root behind an ``nvcc`` that may be a wrapper script or a symlink.

    nvcc itself knows where it lives: ``--dryrun`` prints ``_HERE_=<toolkit>/bin`` without
    compiling anything. Failing that, follow symlinks, then a shell wrapper's ``exec`` line.
    """
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "fastformer_probe.cu"], capture_output=True, text=True,
                             timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m and os.path.isfile(os.path.join(m.group(1).strip(), "nvcc")):
            return os.path.dirname(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    real = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"exec\s+['\"]?([^\s'\"]+/nvcc)\b", head)
            if m and os.path.isfile(m.group(1).decode()):
                return os.path.dirname(os.path.dirname(os.path.realpath(m.group(1).decode())))
    except OSError:
        pass
    return None


def _library_dir(root: str) -> Optional[str]:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if glob.glob(os.path.join(root, sub, "libcudart.so*")):
            return os.path.join(root, sub)
    return None


def find_cuda_toolkit() -> Optional[CudaToolkit]:
    """The CUDA toolkit to build with, or None when there is none.

    Order: ``$CUDA_HOME`` (or ``$CUDA_PATH``) when set; else ``nvcc`` on PATH resolved to the
    toolkit it belongs to (wrappers and symlinks are common: torch's own guess, the folder above
    PATH's nvcc, then lacks the libraries and the link fails with ``cannot find -lcudart``);
    else /usr/local/cuda. Raises :class:`ToolkitError` naming the fix when the toolkit found
    lacks nvcc, its headers or libcudart.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        root, found_by = os.path.realpath(env), "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH"
    else:
        on_path = shutil.which("nvcc")
        if on_path:
            root = _root_from_nvcc(on_path)
            found_by = f"nvcc on PATH ({on_path})"
            if root is None:
                raise ToolkitError(f"nvcc on PATH ({on_path}) does not lead to a CUDA toolkit root; {FIX_HINT}")
        elif os.path.isfile("/usr/local/cuda/bin/nvcc"):
            root, found_by = os.path.realpath("/usr/local/cuda"), "/usr/local/cuda"
        else:
            return None
    nvcc = os.path.join(root, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        raise ToolkitError(f"the CUDA toolkit from {found_by} ({root}) has no bin/nvcc; {FIX_HINT}")
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        raise ToolkitError(f"the CUDA toolkit at {root} (from {found_by}) has no include/cuda_runtime.h; {FIX_HINT}")
    if _library_dir(root) is None:
        raise ToolkitError(f"the CUDA toolkit at {root} (from {found_by}) has no lib64/libcudart.so; {FIX_HINT}")
    release, build = _nvcc_version(nvcc)
    return CudaToolkit(root=root, nvcc=nvcc, release=release, build=build, found_by=found_by)


def use_toolkit(toolkit: CudaToolkit) -> None:
    """Make torch's extension builder compile and link with ``toolkit`` (it reads CUDA_HOME once, at import)."""
    import torch.utils.cpp_extension as cpp

    os.environ["CUDA_HOME"] = toolkit.root
    cpp.CUDA_HOME = toolkit.root


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def extension(toolkit: Optional[CudaToolkit]):
    """The setuptools Extension for ``fastformer._C``: C++ CPU kernels always, CUDA kernels with a toolkit.

    Source paths are relative to the repository root (setup.py's folder), as setuptools wants.
    The build's facts (toolkit, archs) go in as defines, so the built module reports what it
    really was built with (``fastformer._C.build_info``).
    """
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, REPO) for p in glob.glob(str(CSRC / "**" / pattern), recursive=True))

    cpp_sources = rel("*.cpp")
    if toolkit is None:
        # CUDA bindings (csrc/cuda/*.cpp) only compile next to their kernels.
        cpp_sources = [s for s in cpp_sources if not s.startswith(os.path.join("csrc", "cuda"))]
        return CppExtension("fastformer._C", cpp_sources, extra_compile_args={"cxx": list(CXX_FLAGS)},
                            extra_link_args=list(LINK_FLAGS))
    use_toolkit(toolkit)
    return CUDAExtension(
        "fastformer._C",
        cpp_sources + rel("*.cu"),
        define_macros=[("FASTFORMER_WITH_CUDA", "1")],
        # String defines for the C++ side only (nvcc re-splits arguments with spaces).
        extra_compile_args={"cxx": [*CXX_FLAGS, f"-DFASTFORMER_CUDA_TOOLKIT={_c_string(toolkit.describe())}",
                                    f"-DFASTFORMER_CUDA_ARCHS={_c_string(','.join(CUDA_ARCHS))}"],
                            "nvcc": list(NVCC_FLAGS)},
        extra_link_args=list(LINK_FLAGS),
    )


class _Captured(Exception):
    pass


def torch_compile_flags(toolkit: CudaToolkit) -> Dict[str, List[str]]:
    """The compiler flags torch's ``BuildExtension`` (ninja) passes when it builds our extension.

    Runs torch's real build_extensions on :func:`extension` and stops it where it would write
    its ninja file, so nothing is hand-copied: ``{"nvcc": [...], "cxx": [...]}``, each a full
    flag list (defines, include paths, ``COMMON_NVCC_FLAGS``, ours) to which ``-c SRC -o OBJ``
    is added. Raises RuntimeError if torch's builder changed so that the capture misses.
    """
    import unittest.mock

    import torch.utils.cpp_extension as cpp
    from setuptools import Distribution

    captured: Dict[str, List[str]] = {}

    def capture(**kwargs):
        def unquote(flags):  # torch shell-quotes each flag for ninja; "-c" is added per command
            return [f for f in shlex.split(" ".join(flags or [])) if f != "-c"]

        captured["nvcc"] = unquote(kwargs.get("cuda_cflags")) + unquote(kwargs.get("cuda_post_cflags"))
        captured["cxx"] = unquote(kwargs.get("cflags")) + unquote(kwargs.get("post_cflags"))
        raise _Captured

    ext = extension(toolkit)
    dist = Distribution({"name": "fastformer", "ext_modules": [ext]})
    with tempfile.TemporaryDirectory(prefix="fastformer-flags-") as tmp:
        cmd = cpp.BuildExtension.with_options(use_ninja=True)(dist)
        cmd.build_temp = cmd.build_lib = tmp
        cmd.ensure_finalized()
        cwd = os.getcwd()
        os.chdir(REPO)  # the extension's sources are relative to the repository
        try:
            with unittest.mock.patch.object(cpp, "_write_ninja_file_and_compile_objects",
                                            lambda *a, **k: capture(**k)), \
                    unittest.mock.patch.object(cpp, "is_ninja_available", lambda: True, create=True):
                cmd.run()
        except _Captured:
            pass
        finally:
            os.chdir(cwd)
    if not captured.get("nvcc"):
        raise RuntimeError(
            "could not capture the nvcc flags of torch's BuildExtension (torch "
            f"{getattr(sys.modules.get('torch'), '__version__', '?')} changed its build internals?); "
            "update csrc/fastformer_build.py:torch_compile_flags"
        )
    return captured


def nvcc_command(toolkit: CudaToolkit, flags: List[str], source: Path, obj: Path) -> List[str]:
    """The nvcc command line that compiles ``source`` to ``obj`` as the extension build would."""
    return [toolkit.nvcc, *flags, "-c", str(source), "-o", str(obj)]
