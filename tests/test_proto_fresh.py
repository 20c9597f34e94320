"""The committed generated code must be what `make proto` makes from proto/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "proto"))
import generate  # noqa: E402  (proto/generate.py)


def test_generated_code_is_fresh(tmp_path):
    fresh = generate.generate(tmp_path)
    stale = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_generated_module_is_the_package_one():
    # The generated gRPC module imports the messages by package path; a layout change
    # that breaks that import would only show at run time.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import openexample.v1.openexample_pb2_grpc as g; print(g.OpenExampleStub.__name__)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == "OpenExampleStub"
