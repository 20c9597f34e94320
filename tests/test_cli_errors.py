"""Every CLI error path a new user meets is one line naming the problem: no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.procs import ROOT
from controller.cli import main as controller_main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """TorchScript files a user might bring: one for 8x8 inputs, one with 3 classes, and
    an ONNX file onnxruntime cannot read."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name, net in (
        ("eight", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))),
        ("three", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))),
    ):
        out[name] = folder / f"{name}.pt"
        torch.jit.save(torch.jit.script(net), str(out[name]))
    out["onnx"] = folder / "model.onnx"
    out["onnx"].write_bytes(b"\x08\x07not really a model")
    return out


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--dataset", "nope"], "cannot load data set 'nope': unknown data set"),
        (["--dataset", "idx:/no/such/folder"], "no train-images-idx3-ubyte"),
        (["--fpr", "2"], "--fpr must be in (0, 1), got 2.0"),
        (["--model", "/no/such/model.pt"], "--model /no/such/model.pt: no such file"),
        (["--model", "{onnx}"], "not a readable ONNX model"),
        (["--model", "{eight}"], "refuses the data set's inputs of shape (1, 28, 28)"),
        (["--model", "{three}"], "gives outputs of shape (3,) for the data set's 10 classes"),
    ],
)
def test_train_refuses_in_one_line(tmp_path, capsys, models, flags, expect) -> None:
    flags = [f.format(**{k: str(v) for k, v in models.items()}) for f in flags]
    rc = controller_main(["train", "margin", *flags, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("openexample-controller train: ") and expect in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing was trained


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_an_agent_whose_model_refuses_the_shape_says_so(models) -> None:
    p = _run(
        "agents.cli",
        "attach",
        "--model",
        str(models["eight"]),
        "--input-shape",
        "1,28,28",
        "--controller",
        "127.0.0.1:1",
        "--plaintext",
        "--serve",
        "127.0.0.1:0",
        "--serve-plaintext",
        "--connect-timeout",
        "1",
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "the model refuses an input of shape (1, 28, 28)" in last
    assert "mat1 and mat2 shapes cannot be multiplied" in last


@pytest.mark.parametrize("which", ["grpc", "metrics"])
def test_a_port_in_use_is_named(tmp_path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen, metrics = (
            ("127.0.0.1:0", str(port)) if which == "metrics" else (f"127.0.0.1:{port}", "-1")
        )
        p = _run(
            "controller.cli",
            "serve",
            "--plaintext",
            "--listen",
            listen,
            "--metrics-port",
            metrics,
            "--journal",
            str(tmp_path / "journal.sqlite3"),
        )
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert f"127.0.0.1:{port}" in p.stderr.strip().splitlines()[-1]
