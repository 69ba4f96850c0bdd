"""bench/setup_env.sh's rebuild decision (bench/setup_state.py): the extension is
rebuilt exactly when something it is built from changed, or its file was replaced."""

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def state(tmp_path, monkeypatch):
    """setup_state pointed at a miniature checkout in tmp_path (csrc, setup.py, a built extension)."""
    spec = importlib.util.spec_from_file_location("setup_state", REPO / "bench" / "setup_state.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    repo = tmp_path / "repo"
    (repo / "csrc" / "cpu").mkdir(parents=True)
    (repo / "fastformer").mkdir()
    (repo / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 1; }\n")
    (repo / "csrc" / "launch.h").write_text("#pragma once\n")
    (repo / "setup.py").write_text("# setup\n")
    (repo / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n')
    (repo / "fastformer" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"\x7fELF built")
    monkeypatch.setattr(mod, "REPO", repo)
    monkeypatch.setattr(mod, "torch_identity", lambda: "__version__ = '2.13.0+cpu'")
    mod.venv = tmp_path / "venv"
    return mod


def test_fresh_after_stamp(state):
    assert state.stamp_state(state.venv).startswith("stale no build stamp")
    state.write_stamp(state.venv)
    assert state.stamp_state(state.venv) == "fresh"


@pytest.mark.parametrize("change, reason", [
    (lambda s: (s.REPO / "csrc" / "cpu" / "kernel.cpp").write_text("int f() { return 2; }\n"), "sources"),
    (lambda s: (s.REPO / "csrc" / "launch.h").write_text("#pragma once // header\n"), "sources"),
    (lambda s: (s.REPO / "csrc" / "cpu" / "new.cpp").write_text("\n"), "sources"),
    (lambda s: (s.REPO / "setup.py").write_text("# setup, changed\n"), "setup.py"),
    (lambda s: setattr(s, "torch_identity", lambda: "__version__ = '2.14.0'"), "torch version"),
    (lambda s: next((s.REPO / "fastformer").glob("_C*")).write_bytes(b"\x7fELF another build"), "replaced"),
    (lambda s: next((s.REPO / "fastformer").glob("_C*")).unlink(), "removed"),
])
def test_stale_when_an_input_changes(state, change, reason):
    state.write_stamp(state.venv)
    change(state)
    verdict = state.stamp_state(state.venv)
    assert verdict.startswith("stale") and reason in verdict, verdict


def test_pyproject_build_system_counts_but_pytest_settings_do_not(state):
    state.write_stamp(state.venv)
    (state.REPO / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n\n'
                                               '[tool.pytest.ini_options]\nfilterwarnings = []\n')
    assert state.stamp_state(state.venv) == "fresh"
    (state.REPO / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools", "ninja"]\n')
    assert "sources" in state.stamp_state(state.venv)


def test_build_switch_change_is_stale(state, monkeypatch):
    state.write_stamp(state.venv)
    monkeypatch.setenv("FASTFORMER_NO_CUDA", "1")
    assert "build switches" in state.stamp_state(state.venv)


def test_unchanged_python_sources_need_no_rebuild(state):
    state.write_stamp(state.venv)
    (state.REPO / "fastformer" / "__init__.py").write_text("# editable install: no rebuild\n")
    assert state.stamp_state(state.venv) == "fresh"


def test_check_command_output_format():
    """What setup_env.sh parses: 'need <req>' lines, then one 'build fresh|stale <why>' line."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "setup_state.py"), "check", sys.prefix],
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert out and out[-1].startswith(("build fresh", "build stale "))
    assert all(line.startswith("need ") for line in out[:-1])


def test_suite_log_opens_with_info_report():
    """tests/run.sh's log starts with fastformer.info's report (printed by conftest, FASTFORMER_INFO_HEADER=1)."""
    import os

    env = dict(os.environ, FASTFORMER_INFO_HEADER="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_setup_env.py::test_fresh_after_stamp", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    head = proc.stdout.split("1 passed")[0]
    assert head.startswith("fastformer ") and "backend    available  auto" in head
    assert "FASTFORMER_INFO_HEADER" in (REPO / "tests" / "run.sh").read_text()


def test_build_progress_shows_files_link_errors_and_heartbeat():
    """What a user sees while the extension compiles (bench/build_progress.sh on a scripted pip -v stream)."""
    script = r'''
FASTFORMER_REPO=/repo
_ff_say() { printf '[setup] %s\n' "$*"; }
. bench/build_progress.sh
FASTFORMER_HEARTBEAT_S=1 ff_build_progress < <(
  echo "  running build_ext"; sleep 1.5
  printf '  [1/2] c++ -MMD -c /repo/csrc/cpu/a.cpp -o a.o'; sleep 1.2; echo " -O3"
  echo "  /repo/csrc/b.cpp:3:1: error: expected ';'"
  echo "  [2/2] c++ -c /repo/csrc/b.cpp -o b.o"
  echo "  g++ -pthread -shared a.o b.o -o _C.so")
'''
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    assert any("still building (no file compiled yet" in l for l in lines), out
    assert "[setup]   [1/2] compiled csrc/cpu/a.cpp" in lines  # a line split by a heartbeat still parses
    assert "[setup]   [2/2] compiled csrc/b.cpp" in lines
    assert any("error: expected ';'" in l for l in lines)
    assert lines[-1] == "[setup]   linking fastformer._C"
