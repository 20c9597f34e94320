"""Shared fixtures: the example model and detector artifacts (trained once, cached),
and a factory for real controller processes on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.procs import ROOT, ControllerProcess

CACHE = Path(os.environ.get("OPENEXAMPLE_CACHE", ROOT / "var" / "cache"))
MODEL_ID = "mnist-cnn"


@pytest.fixture(scope="session")
def example_model() -> Path:
    from controller.training.example_model import ensure_example_model

    return ensure_example_model(CACHE, "mnist5k")


@pytest.fixture(scope="session")
def artifacts(example_model) -> list[Path]:
    from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts

    return ensure_artifacts(DEFAULT_DETECTORS, cache=CACHE)


@pytest.fixture(scope="session")
def mnist():
    from controller.training import datasets

    return datasets.load("mnist5k").split()


@pytest.fixture
def controller(tmp_path, artifacts):
    """Factory: start a controller process with config overrides; all stopped at teardown."""
    started: list[ControllerProcess] = []

    def start(**config) -> ControllerProcess:
        cfg = {
            "models": {MODEL_ID: {"detectors": [str(p) for p in artifacts], "fpr": 0.01}},
            # Generous budget: CI machines are shared; latency is measured by bench/.
            "budget_us": 3_000_000,
            **config,
        }
        proc = ControllerProcess(tmp_path / f"controller{len(started)}", cfg)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
