"""Shared fixtures: the example model and detector artifacts (trained once, cached),
a factory for real controller processes on loopback, and the session-wide check that no
process a test started is still running when the suite ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import procs
from bench.procs import ROOT, ControllerProcess

CACHE = Path(os.environ.get("OPENEXAMPLE_CACHE", ROOT / "var" / "cache"))
MODEL_ID = "mnist-cnn"
# How long processes still stopping at the end of the session get before they count.
LEFTOVER_GRACE_S = float(os.environ.get("OPENEXAMPLE_LEFTOVER_GRACE_S", "5"))


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite fails if a process a test (or fixture) started outlives it: at the end of
    the session every descendant of pytest still running after a short grace is named,
    then killed. Orphaned grandchildren count too (pytest is their subreaper); what ran
    before the session and multiprocessing's own helpers do not."""
    me = os.getpid()
    procs.become_subreaper()
    before = set(procs.alive(procs.descendants(me)))
    yield
    left = procs.leftovers(me, exclude=before, grace_s=LEFTOVER_GRACE_S)
    if left:
        procs.kill_leftovers(left)
        names = "\n".join(f"  pid {pid}: {cmd or '?'}" for (pid, _), cmd in sorted(left.items()))
        pytest.fail(
            f"{len(left)} process(es) started by the tests still running at the end of the"
            f" session (now killed):\n{names}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def example_model() -> Path:
    from controller.training.example_model import ensure_example_model

    return ensure_example_model(CACHE, "mnist5k")


@pytest.fixture(scope="session")
def cnn_onnx(example_model, tmp_path_factory) -> Path:
    """The example CNN (its TorchScript weights) exported as ONNX, any batch size."""
    from controller.reference_model import load_model
    from controller.training.example_model import SmallCNN
    from tests.test_onnx_model import export_onnx

    net = SmallCNN(10)
    net.load_state_dict(load_model(example_model).state_dict())
    path = tmp_path_factory.mktemp("onnx-cnn") / "cnn.onnx"
    return export_onnx(net.eval(), path, (1, 28, 28), None)


@pytest.fixture(scope="session")
def artifacts(example_model) -> list[Path]:
    from controller.training.train import DEFAULT_DETECTORS, ensure_artifacts

    return ensure_artifacts(DEFAULT_DETECTORS, cache=CACHE)


@pytest.fixture(scope="session")
def mnist():
    from controller.training import datasets

    return datasets.load("mnist5k").split()


@pytest.fixture(scope="session")
def fgsm(example_model, mnist):
    """FGSM eps 0.3 (ART) on test images the example model gets right: (clean, adv)."""
    import numpy as np
    import torch
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    from controller.reference_model import load_model

    model = load_model(example_model)
    clf = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    x, y = mnist.test.x[:300], mnist.test.y[:300]
    adv = FastGradientMethod(clf, eps=0.3).generate(x).astype(np.float32)
    fooled = clf.predict(adv).argmax(1) != y
    return x[fooled], adv[fooled]


@pytest.fixture
def controller(tmp_path, artifacts):
    """Factory: start a controller process with config overrides (mTLS, certificates
    from a development CA in its folder; ``native=[...]`` adds native listeners); all
    stopped at teardown."""
    started: list[ControllerProcess] = []

    def start(native=(), **config) -> ControllerProcess:
        cfg = {
            "models": {MODEL_ID: {"detectors": [str(p) for p in artifacts], "fpr": 0.01}},
            # Generous budget: CI machines are shared; latency is measured by bench/.
            "budget_us": 3_000_000,
            **config,
        }
        proc = ControllerProcess(tmp_path / f"controller{len(started)}", cfg, native=native)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
