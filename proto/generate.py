"""Regenerate the Python code for proto/ (``make proto``).

Writes ``openexample/v1/openexample_pb2{,_grpc}.py`` and their ``.pyi`` stubs
(mypy-protobuf). ``--out DIR`` writes elsewhere; the staleness test uses that to
compare a fresh generation with the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = [
    "openexample/v1/openexample.proto",
    "openexample/v1/predict.proto",
    "openexample/v1/admin.proto",
    "openexample/v1/oip.proto",
    "openexample/v1/cluster.proto",
]
GENERATED = [
    p.removesuffix(".proto") + suffix
    for p in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
]


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into ``out``."""
    from grpc_tools import protoc  # dev dependency, pinned in setup.cfg

    bindir = Path(sys.executable).parent
    plugins = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        exe = bindir / name
        if not exe.exists():
            found = shutil.which(name)
            if found is None:
                raise SystemExit(f"{name} not found: pip install -e '.[dev]'")
            exe = Path(found)
        plugins.append(f"--plugin={name}={exe}")
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        *plugins,
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [out / g for g in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
