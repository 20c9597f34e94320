"""Bench your own model: ``openexample-bench detection --model PATH --dataset NAME`` and
``latency --model PATH``. A model file the bench cannot use is refused in one line; the
detectors trained for a model are cached by the model file's digest, so two models never
share artifacts; and the detection bench runs end to end on a model the project did not
train."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cli


def _mlp(path: Path, seed: int, inputs: int = 784) -> Path:
    """A small untrained MLP saved as TorchScript, the way a user saves theirs."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(inputs, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("own-models")
    onnx = folder / "model.onnx"
    onnx.write_bytes(b"\x08\x07not really a model")  # an ONNX file onnxruntime cannot read
    return {
        "a": _mlp(folder / "a.pt", 0),
        "b": _mlp(folder / "b.pt", 1),
        "eight": _mlp(folder / "eight.pt", 0, inputs=64),
        "onnx": onnx,
    }


@pytest.mark.parametrize(
    "argv, expect",
    [
        pytest.param(
            ["detection", "--model", "/no/such/model.pt"],
            "--model /no/such/model.pt: no such file",
            id="detection-missing",
        ),
        pytest.param(
            ["latency", "--model", "/no/such/model.pt"],
            "--model /no/such/model.pt: no such file",
            id="latency-missing",
        ),
        pytest.param(
            ["detection", "--model", "{onnx}"],
            "not a readable ONNX model (Protobuf parsing failed.); export the model with"
            " torch.onnx.export",
            id="detection-onnx",
        ),
        pytest.param(
            ["latency", "--model", "{onnx}"],
            "not a readable ONNX model (Protobuf parsing failed.); export the model with"
            " torch.onnx.export",
            id="latency-onnx",
        ),
        pytest.param(
            ["detection", "--model", "{eight}"],
            "refuses the data set's inputs of shape (1, 28, 28)",
            id="detection-wrong-shape",
        ),
        pytest.param(
            ["latency", "--model", "{eight}"],
            "(the latency bench sends mnist5k inputs",
            id="latency-wrong-shape",
        ),
        pytest.param(
            ["detection", "--dataset", "nope"], "cannot load data set 'nope'", id="dataset"
        ),
        pytest.param(
            ["detection", "--detectors", "margin,nope"],
            "--detectors: unknown detector 'nope'",
            id="detectors",
        ),
        pytest.param(
            ["detection", "--attacks", "FGSM eps=0.3,FGSM 0.7"],
            "--attacks: unknown ['FGSM 0.7']; this run has FGSM eps=0.3, R+FGSM eps=0.3",
            id="attacks",
        ),
    ],
)
def test_a_model_the_bench_cannot_use_is_refused_in_one_line(capsys, models, argv, expect):
    argv = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    rc = cli.main([*argv, "--quick", "--out", "/nonexistent/never-written"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith(f"openexample-bench {argv[0]}: ") and expect in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_the_console_script_refuses_an_unreadable_onnx_model_without_a_traceback(models, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bench.cli", "detection", "--model", str(models["onnx"])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "not a readable ONNX model" in p.stderr
    assert not (tmp_path / "var").exists()  # nothing trained, nothing written


def test_artifacts_are_keyed_by_the_model_files_digest(tmp_path, models, monkeypatch):
    """Two model files: two folders, each set made for its model; the same bytes again
    (here under another name): the cached set, nothing refitted; a file changed in place:
    a new set. The example model keeps its folder."""
    from controller.detectors.base import Detector
    from controller.training import train
    from openexample.digests import file_digest

    cache = tmp_path / "cache"
    names = ("margin",)  # nothing to fit: calibration only
    (a,) = train.ensure_artifacts(names, cache=cache, model=models["a"])
    (b,) = train.ensure_artifacts(names, cache=cache, model=models["b"])
    assert a.parent != b.parent
    assert a.parent.parent.parent == cache / "artifacts" / "mnist5k"
    for path, model in ((a, models["a"]), (b, models["b"])):
        meta = Detector.load(path).meta
        assert meta["model_digest"] == file_digest(model)
        assert meta["model"] == str(model.resolve())
    assert Detector.load(a).threshold != Detector.load(b).threshold

    built: list[Path] = []
    real_build = train.build_artifacts
    monkeypatch.setattr(
        train, "build_artifacts", lambda *a, **k: built.append(a[1]) or real_build(*a, **k)
    )
    copy = shutil.copy(models["a"], tmp_path / "same-bytes.pt")
    manifest = (a / "manifest.json").read_text()
    assert train.ensure_artifacts(names, cache=cache, model=copy) == [a]
    assert train.ensure_artifacts(names, cache=cache, model=models["a"]) == [a]
    assert built == [] and (a / "manifest.json").read_text() == manifest

    changed = shutil.copy(models["a"], tmp_path / "changed.pt")
    _mlp(changed, 2)  # retrained in place
    (d,) = train.ensure_artifacts(names, cache=cache, model=changed)
    assert d.parent not in (a.parent, b.parent) and built == [d.parent]

    # the example model's sets keep the folder existing caches (and the notice) use
    assert train.artifacts_folder(("desvig", "margin"), cache=cache) == (
        cache / "artifacts" / "mnist5k" / "desvig+margin"
    )


def test_first_run_notice_for_an_own_model_does_not_train_the_example_one(
    tmp_path, monkeypatch, models
):
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    args = cli.build_parser().parse_args(["detection", "--quick", "--model", str(models["a"])])
    notice = cli.first_run_notice(args)
    assert "the example model" not in notice
    assert "the detectors" in notice and "4 attack sets" in notice


def test_bid_network_adapts_to_the_input_size_or_says_it_cannot():
    from bench.detection import bid_network

    for shape in ((1, 28, 28), (1, 12, 16), (3, 32, 32)):
        net = bid_network(shape)
        assert net(torch.zeros(2, *shape)).shape == (2, 2)
    assert sum(p.numel() for p in bid_network((1, 28, 28)).parameters()) == (
        8 * 9 + 8 + 16 * 8 * 9 + 16 + 16 * 5 * 5 * 2 + 2  # the 28x28 CNN, as it always was
    )
    assert bid_network((1, 8, 8)) is None


@pytest.mark.integration
def test_detection_bench_on_an_own_model_end_to_end(tmp_path):
    """``detection --model --dataset --quick`` on an MLP of the user's, margin only (no
    CGAN to train), in a folder of its own: the attacks are made against that model,
    the report names it, the baselines and Table IV (its own controller + agent) run."""
    from controller.training import datasets
    from openexample.digests import file_digest

    ds = datasets.load("digits")
    split = ds.split()
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(split.train.x.copy()), torch.from_numpy(split.train.y.copy())
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = tmp_path / "digits-mlp.pt"
    torch.jit.save(torch.jit.script(net.eval()), str(model))

    cmd = [sys.executable, "-m", "bench.cli", "detection", "--quick", "--detectors", "margin"]
    cmd += ["--model", str(model), "--dataset", "digits", "--out", "out"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert report["model"] == {
        "path": str(model),
        "digest": file_digest(model),
        "example": False,
    }
    assert report["dataset"] == "digits" and report["input_shape"] == [1, 8, 8]
    assert report["n_test"] == 200 and report["clean_accuracy"] > 0.8
    # 8x8 is too small for ART's BinaryInputDetector CNN: skipped, and said so
    assert report["baselines"] == ["feature_squeezing"]
    assert "at least 10x10" in report["skipped"]["binary_input_detector"]
    assert "binary_input_detector" in p.stderr
    for a in report["attacks"]:
        assert [d["detector"] for d in a["detectors"]] == ["margin", "feature_squeezing", "fused"]
    fused = {a["attack"]: a["detectors"][-1] for a in report["attacks"]}
    assert fused["DeepFool"]["tpr_at_fpr"]["0.01"] > 0.5  # the margin sees minimal attacks
    assert [r["set"] for r in report["table_iv"]] == ["baseline", "FGSM", "R+FGSM", "DeepFool"]
    assert report["table_iv"][0]["accuracy_with_openexample"] > 0.8
    md = (tmp_path / "out" / "detection.md").read_text()
    assert "the user's own" in md and "digits test images" in md
    # everything the run trained is under its own folder, keyed by the model
    cached = tmp_path / "var" / "cache" / "artifacts" / "digits"
    assert [p.name for p in cached.iterdir()] == [f"model-{file_digest(model)[7:23]}"]
    assert not (tmp_path / "var" / "cache" / "digits").exists()  # no example model trained
