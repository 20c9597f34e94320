"""The package boundaries of ARCHITECTURE.md §4, and the console scripts."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "openexample": {"controller", "agents", "bench"},
    "controller": {"agents", "bench"},
    "agents": {"controller", "bench"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_its_forbidden_neighbours(package):
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_top_levels(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    "script", ["openexample-controller", "openexample-agent", "openexample-bench"]
)
def test_console_script_has_help(script):
    exe = shutil.which(script) or str(ROOT / ".venv" / "bin" / script)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: " + script)


SERVE_IMPORTS = """
import json, sys
import controller.cli, controller.server, controller.pipeline
from controller import detectors
names = detectors.available()
for name in names:
    detectors.get(name)
loaded = sorted(
    m for m in sys.modules
    if m in ("controller.training", "art") or m.startswith(("controller.training.", "art."))
)
print(json.dumps({"detectors": names, "offline": loaded}))
"""


def test_serve_never_imports_the_offline_room():
    """What ``serve`` runs (the daemon and every registered detector) loads nothing from
    controller/training (datasets, the example model, ``train``) and not ART."""
    out = subprocess.run(
        [sys.executable, "-c", SERVE_IMPORTS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"desvig", "feature_squeezing", "margin", "phash_prototype"} <= set(report["detectors"])
    assert report["offline"] == []
