"""Build and install fastformer.

The compiled extension ``fastformer._C`` always gets the C++ CPU sources; the
CUDA sources join when the installed torch has CUDA and a CUDA toolkit is found
($CUDA_HOME, else nvcc on PATH resolved through wrappers to its toolkit, else
/usr/local/cuda; see csrc/fastformer_build.py, which also holds the sources and flags).
Build against the torch you already have, without build isolation:

    pip install --no-build-isolation -e .

If the extension fails to compile, the install still succeeds (the pure-Python
and Triton paths work) and prints why, unless FASTFORMER_REQUIRE_EXT=1, which
makes a compile failure fatal (CI sets it). FASTFORMER_REQUIRE_CUDA=1 also makes
a missing toolkit fatal (a GPU build); FASTFORMER_NO_CUDA=1 builds the CPU
kernels only; FASTFORMER_BUILD_DIR keeps the build objects for reuse;
FASTFORMER_PREBUILT_EXT=1 installs the Python side around an existing
fastformer/_C*.so.
"""

import os
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "fastformer builds against an installed torch: install torch first, then run "
        "'pip install --no-build-isolation -e .' (build isolation would fetch a different torch)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc"))
import fastformer_build as build  # noqa: E402  (sources, flags, toolkit; shared with the CI compile checks)


def _toolkit():
    """The CUDA toolkit to build the CUDA kernels with, or None for a CPU-only extension."""
    if os.environ.get("FASTFORMER_NO_CUDA") == "1":
        print("fastformer: FASTFORMER_NO_CUDA=1, building the CPU kernels only")
        return None
    if torch.version.cuda is None:
        print(f"fastformer: torch {torch.__version__} has no CUDA, building the CPU kernels only")
        return None
    require = os.environ.get("FASTFORMER_REQUIRE_CUDA") == "1"
    try:
        toolkit = build.find_cuda_toolkit()
    except build.ToolkitError as exc:
        if require or os.environ.get("FASTFORMER_REQUIRE_EXT") == "1":
            sys.exit(f"fastformer: {exc}")
        print(f"fastformer: WARNING: {exc}\nBuilding the CPU kernels only.", file=sys.stderr)
        return None
    if toolkit is None:
        message = (f"no CUDA toolkit found for torch {torch.__version__} (CUDA {torch.version.cuda}): nvcc is "
                   f"not on PATH, CUDA_HOME is unset and /usr/local/cuda is absent; {build.FIX_HINT}")
        if require:
            sys.exit(f"fastformer: {message}")
        print(f"fastformer: WARNING: {message}\nBuilding the CPU kernels only.", file=sys.stderr)
        return None
    if toolkit.release.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(f"fastformer: nvcc {toolkit.release} at {toolkit.root} cannot build for torch {torch.__version__}, "
                 f"which was built with CUDA {torch.version.cuda} (the major versions must match); "
                 f"{build.FIX_HINT}")
    print(f"fastformer: building the CUDA kernels for {', '.join(build.CUDA_ARCHS)} with {toolkit.describe()} "
          f"(nvcc {toolkit.nvcc}, found by {toolkit.found_by}), torch {torch.__version__}")
    return toolkit


# Resolved before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
TOOLKIT = None if os.environ.get("FASTFORMER_PREBUILT_EXT") == "1" else _toolkit()
if TOOLKIT is not None:
    os.environ["CUDA_HOME"] = TOOLKIT.root
from torch.utils.cpp_extension import BuildExtension  # noqa: E402


class TolerantBuildExtension(BuildExtension):
    """Keeps the install usable when the extension does not compile, and says why.

    FASTFORMER_BUILD_DIR=<dir> keeps the object files there instead of in pip's
    throw-away temporary folder, so ninja recompiles only what changed
    (bench/setup_env.sh points it into the virtual environment).
    """

    def finalize_options(self):
        super().finalize_options()
        if os.environ.get("FASTFORMER_BUILD_DIR"):
            self.build_temp = os.path.join(os.environ["FASTFORMER_BUILD_DIR"], "temp")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if os.environ.get("FASTFORMER_REQUIRE_EXT") == "1":
                raise
            print(
                f"\nWARNING: building {ext.name} failed ({type(exc).__name__}: {exc}).\n"
                "fastformer will install without its C++/CUDA backends; the reference and Triton\n"
                "paths still work. Check the compiler output above (a C++17 compiler is needed;\n"
                "for CUDA, an nvcc matching torch.version.cuda), or set FASTFORMER_NO_CUDA=1 to\n"
                "build the CPU kernels only. `python -m fastformer.info` shows what is available.\n",
                file=sys.stderr,
            )


setup(
    name="fastformer",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for transformers, as drop-in PyTorch modules",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastformer", "fastformer.*"]) + ["fastformer.kernels"],
    package_dir={"fastformer.kernels": "kernels"},
    # FASTFORMER_PREBUILT_EXT=1: fastformer/_C*.so is already in place (bench/gpu.sh unpacks a carried
    # wheel's); install the Python side only.
    ext_modules=[] if os.environ.get("FASTFORMER_PREBUILT_EXT") == "1" else [build.extension(TOOLKIT)],
    cmdclass={"build_ext": TolerantBuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy<2.4"],
        # examples/: progress bars; vit_digits.py's bundled digits
        "examples": ["tqdm", "scikit-learn"],
    },
    zip_safe=False,
)
