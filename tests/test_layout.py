"""The rooms of docs/architecture.md and what may import what, and the console scripts."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "openexample": {"controller", "agents", "bench", "fuzz"},
    "controller": {"agents", "bench", "fuzz"},
    "agents": {"controller", "bench", "fuzz"},
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


# The sans-I/O rooms (docs/architecture.md): messages and ``now`` in, messages and events
# out. No event loop, sockets, threads, clocks or metrics library, directly or through
# another project module they import. The generated gRPC stubs in openexample/v1 are
# imported only by the shells.
SANS_IO = [
    *(
        p
        for p in sorted((ROOT / "openexample").rglob("*.py"))
        # shells shared by both planes: generated stubs, TLS credentials, the metrics HTTP
        if not p.name.endswith("_pb2_grpc.py") and p.name not in ("grpc_tls.py", "metrics_http.py")
    ),
    ROOT / "controller" / "core.py",
    ROOT / "controller" / "desired.py",
    ROOT / "controller" / "cluster.py",
    ROOT / "controller" / "overflow.py",
    ROOT / "controller" / "consensus.py",
    ROOT / "controller" / "mastership.py",
    ROOT / "controller" / "cluster_work.py",
    ROOT / "controller" / "steps.py",
    ROOT / "controller" / "correction.py",
    ROOT / "controller" / "session.py",
    ROOT / "agents" / "core.py",
    ROOT / "agents" / "counters.py",
    ROOT / "agents" / "results.py",
    ROOT / "agents" / "config.py",
    ROOT / "agents" / "oip.py",
    ROOT / "agents" / "callers.py",
]
IO_MODULES = {
    "asyncio", "grpc", "threading", "time", "prometheus_client", "socket", "selectors", "aiohttp",
    "aiomqtt", "paho",
}  # fmt: skip
PROJECT = ("openexample", "controller", "agents", "bench")


def imported_modules(path: Path) -> set[str]:
    """Full names of the modules a file imports (``from a.b import c`` gives a.b, a.b.c)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_file(name: str) -> Path | None:
    """The project file behind a dotted module name, if it is one of ours."""
    if name.split(".")[0] not in PROJECT:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def io_imports_reachable_from(path: Path) -> dict[str, set[str]]:
    """{project file: I/O modules it imports} over everything ``path`` pulls in."""
    seen: set[Path] = set()
    todo = [path]
    found: dict[str, set[str]] = {}
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        mods = imported_modules(p)
        bad = {m.split(".")[0] for m in mods} & IO_MODULES
        if bad:
            found[str(p.relative_to(ROOT))] = bad
        for m in mods:
            f = module_file(m)
            if f is not None and not f.name.endswith("_pb2_grpc.py"):
                todo.append(f)
    return found


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_core_imports_no_io(path):
    assert io_imports_reachable_from(path) == {}


def test_the_sans_io_check_catches_an_io_import(tmp_path, monkeypatch):
    """The check above can fail: a core that imports a helper that imports time."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "core.py").write_text("from agents import helper\n")
    (tmp_path / "agents" / "helper.py").write_text("import time\n")
    found = io_imports_reachable_from(tmp_path / "agents" / "core.py")
    assert found == {"agents/helper.py": {"time"}}
