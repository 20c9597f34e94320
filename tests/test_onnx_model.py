"""A user's own ONNX model, end to end: the controller's reference copy runs it
(onnxruntime), ``openexample-controller train`` trains the detectors that only call the
model for it and refuses, in one line, those that train through its gradients;
``check`` and ``serve`` take it as ``reference_model`` (and refuse it for a detector that
scores through the torch module); an agent CLI running the ONNX file gets verdicts from
a real controller; and the detection bench attacks it with black-box attacks."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.procs import ROOT
from controller.cli import main as controller_main
from controller.reference_model import model_fn, quiet_torchscript
from controller.training import datasets
from openexample.digests import file_digest
from tests.conftest import CACHE, MODEL_ID


def export_onnx(net: torch.nn.Module, path: Path, shape: tuple[int, ...], batch: int | None):
    """``net`` as ONNX (torch's default exporter, dynamo): any batch size, or a fixed one."""
    dynamic = None if batch is not None else ({0: torch.export.Dim("batch")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            net,
            (torch.zeros(batch or 2, *shape),),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
        )
    return path


def trained_mlp(dataset: str, hidden: int, steps: int) -> torch.nn.Module:
    """A small MLP trained on the data set's training split, full batch (seconds)."""
    split = datasets.load(dataset).split()
    torch.manual_seed(0)
    width = int(np.prod(split.train.x.shape[1:]))
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(width, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(split.train.x.copy()), torch.from_numpy(split.train.y.copy())
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An MNIST MLP as ONNX (any batch size, and a batch of 3 fixed) and as TorchScript."""
    folder = tmp_path_factory.mktemp("onnx-models")
    net = trained_mlp("mnist5k", 64, 60)
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(net), str(folder / "mlp.pt"))
    return {
        "onnx": export_onnx(net, folder / "mlp.onnx", (1, 28, 28), None),
        "fixed": export_onnx(net, folder / "fixed.onnx", (1, 28, 28), 3),
        "pt": folder / "mlp.pt",
    }


@pytest.fixture(scope="module")
def onnx_artifacts(models, tmp_path_factory) -> tuple[list[Path], subprocess.CompletedProcess]:
    """``openexample-controller train desvig,margin --model mlp.onnx`` (the CGAN of mnist5k
    from the tests' cache: trained once per data set, whatever the model)."""
    out = tmp_path_factory.mktemp("onnx-artifacts")
    p = _train("desvig,margin", models["onnx"], out)
    return [out / "desvig", out / "margin"], p


def _train(names: str, model: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "controller.cli", "train", names, "--model", str(model)]
    cmd += ["--out", str(out), "--cache", str(CACHE)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


def _config(tmp_path: Path, detectors: list[Path], reference: Path) -> Path:
    path = tmp_path / "controller.yaml"
    spec = {"detectors": [str(p) for p in detectors], "reference_model": str(reference)}
    path.write_text(yaml.safe_dump({"plaintext": True, "models": {"m": spec}}))
    return path


# ---- the reference copy --------------------------------------------------------------


def test_the_reference_copy_of_an_onnx_model_gives_torchs_logits(models):
    x = datasets.load("mnist5k").split().test.x[:700]  # two batches of the default 512
    want = model_fn(models["pt"])(x)
    for name in ("onnx", "fixed"):  # a fixed batch of 3: run in threes, the last padded
        predict = model_fn(models[name])
        got = predict(x)
        assert got.dtype == np.float32 and got.shape == (700, 10)
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert not hasattr(predict, "module")  # no torch module: no gradients
    assert model_fn(models["onnx"])(x[:1].astype(np.float64)).dtype == np.float32  # cast in


def test_an_unreadable_onnx_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not really a model")
    with pytest.raises(ValueError) as e:
        model_fn(bad)
    assert str(e.value) == "not a readable ONNX model (Protobuf parsing failed.)"


# ---- training --------------------------------------------------------------------------


def test_which_detectors_need_the_models_torch_module():
    """Declared on the class (``Detector.fits_through_model`` / ``scores_through_model``):
    the denoiser family and featuremap (ART attacks on the training split) train through
    the model's gradients; Defed also scores with it."""
    from controller import detectors
    from controller.reference_model import needing_module

    every = [detectors.get(n) for n in detectors.available()]
    assert needing_module(every) == ["defed", "featuremap", "ismn", "uddn"]
    assert needing_module(every, scoring=True) == ["defed"]


# the detectors that only call the model, small (desvig: the tests' cached CGAN, by train)
CALLERS = {
    "feature_squeezing": {},
    "magnet": {"epochs": 1, "num_train": 200, "progress": False},
    "margin": {},
    "phash_prototype": {},
}


@pytest.mark.parametrize("name", sorted(CALLERS))
def test_a_detector_that_only_calls_the_model_fits_and_scores_with_onnx(models, name):
    from controller import detectors
    from controller.detectors.base import make_batch

    split = datasets.load("mnist5k").split()
    predict = model_fn(models["onnx"])
    det = detectors.get(name)(**CALLERS[name])
    assert not det.fits_through_model and not det.scores_through_model
    det.fit(split.train.x[:300], split.train.y[:300], model=predict, dataset="mnist5k")
    det.calibrate(make_batch(split.calibration.x[:200], predict), 0.05)
    scores = det.score(make_batch(split.test.x[:20], predict)).scores
    assert np.asarray(scores).shape == (20,) and np.isfinite(scores).all()


def test_train_fits_the_default_set_for_an_onnx_model(models, onnx_artifacts):
    from controller.detectors.base import Detector

    paths, p = onnx_artifacts
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [str(path) for path in paths]
    for path in paths:
        det = Detector.load(path)
        assert det.threshold is not None
        assert det.meta["model"] == str(models["onnx"].resolve())
        assert det.meta["model_digest"] == file_digest(models["onnx"])
        assert det.meta["model_format"] == "onnx"


@pytest.mark.parametrize(
    "names, named",
    [("defed", "defed needs"), ("margin,ismn,uddn", "ismn, uddn need")],
)
def test_train_refuses_detectors_that_need_gradients_in_one_line(models, tmp_path, names, named):
    p = _train(names, models["onnx"], tmp_path / "out")
    assert p.returncode == 2 and p.stdout == ""
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"openexample-controller train: --model {models['onnx']} is ONNX")
    assert f"{named} the model's gradients: give a TorchScript copy" in p.stderr
    assert "agents may still run the ONNX file" in p.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was fitted


def test_train_refuses_an_unreadable_onnx_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"junk")
    p = _train("margin", bad, tmp_path / "out")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"--model {bad}: not a readable ONNX model" in p.stderr
    assert "torch.onnx.export" in p.stderr


# ---- check and serve -------------------------------------------------------------------


def test_check_passes_with_an_onnx_reference_model(tmp_path, models, onnx_artifacts, capsys):
    paths, _ = onnx_artifacts
    rc = controller_main(["check", "--config", str(_config(tmp_path, paths, models["onnx"]))])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "model m: 2 detectors, fused fpr 0.01, inputs (1, 28, 28), 10 classes" in out
    assert f"trained with model digest {file_digest(models['onnx'])}" in out
    assert "trained with model format onnx" in out
    assert "margin: threshold" in out and "+ reference model" in out


def test_a_detector_scoring_through_the_torch_module_refuses_an_onnx_reference(
    tmp_path, models, capsys
):
    """Defed runs the model's torch module on its denoised inputs: trained with the
    TorchScript copy, it cannot serve beside an ONNX reference model; one line says so."""
    from controller.detectors.base import make_batch
    from controller.detectors.defed import DefedDetector

    split = datasets.load("mnist5k").split()
    predict = model_fn(models["pt"])
    det = DefedDetector(sigmas=[40], widths=[4, 4, 4], epochs=1, train_images=100, progress=False)
    det.fit(split.train.x[:150], split.train.y[:150], model=predict, dataset="mnist5k")
    det.calibrate(make_batch(split.calibration.x[:100], predict), 0.05)
    det.save(tmp_path / "defed")
    rc = controller_main(
        ["check", "--config", str(_config(tmp_path, [tmp_path / "defed"], models["onnx"]))]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "models.m.detectors[0]: defed scores through the model's torch module" in err
    assert "set models.m.reference_model to a TorchScript copy" in err
    rc = controller_main(  # its TorchScript copy serves it
        ["check", "--config", str(_config(tmp_path, [tmp_path / "defed"], models["pt"]))]
    )
    assert rc == 0, capsys.readouterr().err


@pytest.mark.integration
def test_an_agent_cli_running_the_onnx_model_gets_verdicts(controller, models, onnx_artifacts):
    """``openexample-agent attach --model mlp.onnx`` on a controller whose detectors were
    trained for that file and whose reference model is that file: Predict answers with the
    controller's verdicts, and the controller sees the model its detectors were made for."""
    import grpc

    from openexample import grpc_tls, tensor
    from openexample.v1 import openexample_pb2 as pb
    from openexample.v1 import predict_pb2, predict_pb2_grpc
    from tests.peers import serve_agent_cli

    paths, _ = onnx_artifacts
    spec = {"detectors": [str(p) for p in paths], "reference_model": str(models["onnx"])}
    proc = controller(models={MODEL_ID: spec})
    agent, port = serve_agent_cli(proc, str(models["onnx"]), "onnx-line", MODEL_ID)
    try:
        caller = proc.pki.issue("caller/plc-7", overwrite=False)
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", grpc_tls.grpc_channel_credentials(caller)
        )
        stub = predict_pb2_grpc.PredictorStub(channel)
        x = datasets.load("mnist5k").split().test.x[:8]
        labels = model_fn(models["onnx"])(x).argmax(1)
        resp = stub.Predict(
            predict_pb2.PredictRequest(model_id=MODEL_ID, input=tensor.encode(x)), timeout=60
        )
        assert len(resp.results) == 8
        verdicts = {r.verdict for r in resp.results}
        assert verdicts <= {pb.VERDICT_BENIGN, pb.VERDICT_ADVERSARIAL} and verdicts, verdicts
        for r, label in zip(resp.results, labels, strict=True):
            assert r.decided_by == predict_pb2.DECIDED_BY_CONTROLLER
            if r.released:
                assert r.label == label and tuple(r.output.shape) == (10,)
        assert sum(r.released for r in resp.results) >= 6  # clean images: few withheld
        channel.close()
    finally:
        agent.terminate()
        assert agent.wait(20) == 0
    assert not any("but its detectors were trained with" in line for line in proc.log)


# ---- the detection bench ---------------------------------------------------------------


def _bench_args(model: str, attacks: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(model=model, quick=False, attacks=attacks)


def test_an_onnx_model_is_attacked_with_black_box_attacks_only():
    from bench.attacks import BLACK_BOX
    from bench.detection import select_attacks

    specs = select_attacks(_bench_args("m.onnx"))
    labels = ["Square eps=0.1", "Square eps=0.2", "Square eps=0.3", "HopSkipJump"]
    assert [s.name if s.eps is None else f"{s.name} eps={s.eps:g}" for s in specs] == labels
    assert {s.art_class for s in specs} <= BLACK_BOX
    assert specs[0].params["max_iter"] == 5000 and specs[0].budget == "L-inf eps 0.1, 5000 steps"
    quick = select_attacks(argparse.Namespace(model="m.onnx", quick=True, attacks=None))
    assert [(s.name, s.eps) for s in quick] == [("Square", 0.3), ("HopSkipJump", None)]
    assert "FGSM" in {s.name for s in select_attacks(_bench_args("m.pt"))}
    with pytest.raises(ValueError, match=r"\['FGSM eps=0.3'\] need the model's gradients"):
        select_attacks(_bench_args("m.onnx", attacks="FGSM eps=0.3"))


def test_square_attack_fools_the_onnx_model_through_arts_black_box_classifier(models):
    from bench.attacks import adversarials, black_box_attacks, classifier

    x = datasets.load("mnist5k").split().test.x[:40]
    clf = classifier(models["onnx"], x.shape[1:], 10)
    assert type(clf).__name__ == "BlackBoxClassifierNeuralNetwork"
    square = black_box_attacks(quick=True)[0]
    adv = adversarials(square, clf, x, seed=0)
    assert np.abs(adv - x).max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    predict = model_fn(models["onnx"])
    assert (predict(adv).argmax(1) != predict(x).argmax(1)).mean() > 0.5
    np.testing.assert_array_equal(adversarials(square, clf, x, seed=0), adv)  # seeded


@pytest.mark.parametrize(
    "argv, expect",
    [
        (
            ["detection", "--detectors", "margin,defed"],
            "is ONNX, and defed needs the model's gradients",
        ),
        (["detection", "--attacks", "PGD eps=0.3"], "need the model's gradients"),
        (["detection", "--adaptive"], "white-box attacks need the model's gradients"),
    ],
)
def test_the_bench_refuses_what_an_onnx_model_cannot_do_in_one_line(capsys, models, argv, expect):
    from bench import cli

    rc = cli.main([*argv, "--model", str(models["onnx"]), "--quick", "--out", "/nonexistent"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"openexample-bench {argv[0]}: ") and expect in err, err


@pytest.mark.integration
def test_detection_bench_on_an_onnx_model_end_to_end(tmp_path):
    """``detection --model m.onnx --dataset digits --quick``, margin only: black-box attacks
    against the ONNX file, the gradient-only parts skipped and said so, Table IV's clean
    set through a controller and an agent running the ONNX file."""
    model = export_onnx(trained_mlp("digits", 64, 150), tmp_path / "digits.onnx", (1, 8, 8), None)
    cmd = [sys.executable, "-m", "bench.cli", "detection", "--quick", "--detectors", "margin"]
    cmd += ["--model", str(model), "--dataset", "digits", "--out", "out"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    report = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert report["model"]["digest"] == file_digest(model) and report["clean_accuracy"] > 0.8
    assert [a["attack"] for a in report["attacks"]] == ["Square", "HopSkipJump"]
    assert all(a["success_rate"] > 0.3 for a in report["attacks"]), report["attacks"]
    assert set(report["skipped"]) == {
        "gradient_attacks",
        "binary_input_detector",
        "table_iv_attacks",
    }
    assert "ONNX" in report["skipped"]["gradient_attacks"]
    assert "openexample-bench detection: gradient_attacks: skipped (FGSM" in p.stderr
    assert [r["set"] for r in report["table_iv"]] == ["baseline"]
    assert report["table_iv"][0]["accuracy_with_openexample"] > 0.8
    md = (tmp_path / "out" / "detection.md").read_text()
    assert "| Square 0.3 |" in md and "table_iv_attacks: Table IV's" in md
