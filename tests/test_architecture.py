"""The rooms' one direction (models → nn → ops → kernels): importing the ops or the kernels
loads no module of nn/ or models/, and no source file imports a room above its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = {"kernels": 0, "ops": 1, "nn": 2, "models": 3}


@pytest.mark.parametrize("module", ["fastformer", "fastformer.ops", "fastformer.kernels", "fastformer.ops.attention"])
def test_importing_ops_loads_no_modules_or_models(module):
    code = (f"import sys, {module}\n"
            "bad = [m for m in sys.modules if m.startswith(('fastformer.nn', 'fastformer.models'))]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]


def _room(path: Path):
    rel = path.relative_to(REPO).parts
    if rel[0] == "kernels":
        return "kernels"
    if rel[0] == "fastformer" and len(rel) > 2 and rel[1] in ROOMS:
        return rel[1]
    return None


def _imported_rooms(path: Path):
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[: len(pkg) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            names = [parts] if node.module else [parts + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for p in names:
            if p[:1] == ["kernels"] or p[:2] == ["fastformer", "kernels"]:
                yield "kernels"
            elif len(p) > 1 and p[0] == "fastformer" and p[1] in ROOMS:
                yield p[1]


def test_no_room_imports_a_room_above_it():
    files = list((REPO / "fastformer").rglob("*.py")) + list((REPO / "kernels").rglob("*.py"))
    upward = []
    for f in files:
        room = _room(f)
        if room is None:
            continue
        for target in _imported_rooms(f):
            if ROOMS[target] > ROOMS[room]:
                upward.append(f"{f.relative_to(REPO)} ({room}) imports {target}")
    assert not upward, "\n".join(upward)
