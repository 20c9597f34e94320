"""The atheris harnesses in fuzz/ never rot: every corpus file, and every input
``fuzz/make_corpus.py`` makes, goes through its harness's test function (no atheris
needed), and a harness still runs as a script."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bench.procs import ROOT
from fuzz import make_corpus
from fuzz.common import corpus_files

HARNESSES = {
    "codec": "fuzz.fuzz_codec",
    "tensor": "fuzz.fuzz_tensor",
    "framing": "fuzz.fuzz_framing",
    "controller_session": "fuzz.fuzz_controller_session",
    "agent_core": "fuzz.fuzz_agent_core",
}


def test_every_target_has_a_harness_and_a_corpus():
    assert set(HARNESSES) == set(make_corpus.TARGETS)
    for target, module in HARNESSES.items():
        assert target == importlib.import_module(module).TARGET
        assert len(corpus_files(target)) >= 10, target


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_the_corpus_replays_without_a_crash(target):
    """The files, and what make_corpus.py makes now (its regressions even before anyone
    regenerates the files)."""
    harness = importlib.import_module(HARNESSES[target])
    inputs = [(str(p.relative_to(ROOT)), p.read_bytes()) for p in corpus_files(target)]
    inputs += [
        (f"make_corpus {target} #{i}", d) for i, d in enumerate(make_corpus.TARGETS[target]())
    ]
    for name, data in inputs:
        try:
            harness.test_one_input(data)
        except Exception as exc:
            raise AssertionError(f"{name}: {exc!r}") from exc


def test_a_harness_runs_as_a_script_without_atheris():
    cmd = [sys.executable, "fuzz/fuzz_codec.py", "--replay", "fuzz/corpus/codec"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "inputs replayed, no crash" in res.stdout
