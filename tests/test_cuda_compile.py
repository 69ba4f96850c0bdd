"""The CUDA sources compile for sm_80 and sm_90a without a GPU, the main kernels
do not spill, and the torch-facing CUDA binding is valid C++ against torch's headers.

Every compile uses the flags torch's BuildExtension passes when setup.py builds the
extension (captured by csrc/fastformer_build.py, never a copied list): torch's
COMMON_NVCC_FLAGS delete the implicit __half / __nv_bfloat16 conversions and
operators, so e.g. ``T(0.f)`` in a kernel fails here, not on the GPU machine.

Skipped where no CUDA toolkit is found. Uses bench/cuda_resources.py's compile driver (2 jobs).
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import cuda_resources  # noqa: E402

build = cuda_resources.build
pytestmark = pytest.mark.skipif(cuda_resources.find_nvcc() is None, reason="no CUDA toolkit (nvcc) found")


@pytest.fixture(scope="module")
def toolkit():
    return build.find_cuda_toolkit()


@pytest.fixture(scope="module")
def torch_flags(toolkit):
    return build.torch_compile_flags(toolkit)


@pytest.fixture(scope="module")
def compiled(torch_flags):
    return cuda_resources.compile_all(jobs=2, flags=[*torch_flags["nvcc"], "-Xptxas", "-v"])


def test_compile_flags_are_the_extension_builds(torch_flags):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    nvcc = torch_flags["nvcc"]
    missing = [f for f in [*COMMON_NVCC_FLAGS, *build.NVCC_FLAGS, "-DFASTFORMER_WITH_CUDA=1"] if f not in nvcc]
    assert not missing, f"captured nvcc flags lack {missing}: {nvcc}"
    assert any(f.startswith("-DTORCH_EXTENSION_NAME=") for f in torch_flags["cxx"]), torch_flags["cxx"]


def test_torch_flags_reject_implicit_half_conversions(toolkit, torch_flags, tmp_path):
    # The class of bug the flags exist to catch (issue 15): an implicit float -> __half /
    # __nv_bfloat16 construction. If this compiled, the checks above would guard nothing.
    src = tmp_path / "implicit.cu"
    src.write_text(
        "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
        "template <typename T> __global__ void zero(T* out) { out[threadIdx.x] = T(0.f); }\n"
        "template __global__ void zero<__half>(__half*);\n"
        "template __global__ void zero<__nv_bfloat16>(__nv_bfloat16*);\n"
    )
    flags = [f for f in torch_flags["nvcc"] if not f.startswith("-gencode")] + ["-gencode=arch=compute_80,code=sm_80"]
    proc = subprocess.run(build.nvcc_command(toolkit, flags, src, tmp_path / "implicit.o"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, "T(0.f) on __half compiled under the extension's flags"
    assert "__half" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_every_cuda_source_compiles(compiled):
    assert compiled, "no .cu sources found under csrc/"
    failed = [f"{r.source.relative_to(REPO)}:\n{r.log[-3000:]}" for r in compiled if r.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_main_kernels_do_not_spill(compiled):
    rows = cuda_resources.resources(compiled)
    archs = {k.arch for k in rows}
    assert {"sm_80", "sm_90a"} <= archs, f"ptxas reported only {archs}"
    main = [k for k in rows if cuda_resources.is_main_kernel(k)]
    names = {k.kernel.split("<")[0] for k in main}
    assert {"flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel", "softmax_fwd_kernel",
            "softmax_bwd_kernel"} <= names, names
    # Every flash instantiation (2 dtypes x head dims 64/128) is there for both architectures.
    flash_fwd = {(k.kernel, k.arch) for k in main if k.kernel.startswith("flash_fwd_kernel")}
    assert len(flash_fwd) == 8, sorted(flash_fwd)
    spilling = [f"{k.kernel} {k.arch}: {k.spill_stores}/{k.spill_loads} bytes" for k in main
                if k.spill_stores or k.spill_loads]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_cuda_binding_is_valid_cpp(torch_flags):
    # The C++ side of a CUDA build, with the extension build's own g++ flags (defines, includes).
    flags = [f for f in torch_flags["cxx"] if not f.startswith(("-O", "-g", "-W"))]
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cpp")) + [REPO / "csrc" / "bindings.cpp"]
    for source in sources:
        proc = subprocess.run(
            ["g++", "-fsyntax-only", "-w", *flags, str(source)],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )
        assert proc.returncode == 0, f"{source.relative_to(REPO)}:\n{proc.stderr[-3000:]}"


def test_cu_files_include_no_torch_headers():
    # The CPU torch wheel ships no CUDA headers for ATen/c10: .cu/.cuh must stay torch-free,
    # and launch.h / launch_plan.h must not need the CUDA toolkit.
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.suffix not in (".cu", ".cuh", ".h") or "cuda" not in path.parts:
            continue
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{path.relative_to(REPO)} includes {banned}"
        if path.name in ("launch.h", "launch_plan.h"):
            assert "cuda_runtime" not in text and "cuda_fp16" not in text, path.name


def test_fragment_plumbing_matches_an_emulation_of_ldmatrix_and_mma(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # Host-only build: the kernels' swizzle, ldmatrix addressing and fragment packing,
    # driven through emulated ldmatrix/mma (tests/cuda/emulate_fragments.cu), on the CPU.
    exe = tmp_path / "emulate_fragments"
    build = subprocess.run(
        [cuda_resources.find_nvcc(), *COMMON_NVCC_FLAGS, "-std=c++17", "-O1", f"-I{REPO / 'csrc' / 'cuda'}",
         str(REPO / "tests" / "cuda" / "emulate_fragments.cu"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.count(": ok") == 4, run.stdout


def test_toolkit_found_through_an_nvcc_wrapper(toolkit, tmp_path, monkeypatch):
    # A wrapper script on PATH (as on this machine: /usr/local/bin/nvcc execs the toolkit's) must
    # lead to the toolkit root, where the libraries are; its parent folder would not link (issue 15).
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{toolkit.nvcc}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:/usr/bin:/bin")
    found = build.find_cuda_toolkit()
    assert found.root == toolkit.root and found.nvcc == toolkit.nvcc, found
    assert str(wrapper) in found.found_by


def test_a_wrong_cuda_home_fails_naming_the_fix(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(build.ToolkitError, match="include/cuda_runtime.h.*set CUDA_HOME to the CUDA toolkit root"):
        build.find_cuda_toolkit()
