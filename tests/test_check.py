"""``openexample-controller check``, and the compatibility check ``serve`` runs too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from bench.procs import ROOT
from controller.cli import main


def _config(tmp_path: Path, detectors: list[Path], **model: object) -> Path:
    path = tmp_path / "controller.yaml"
    spec = {"detectors": [str(p) for p in detectors], "fpr": 0.01, **model}
    path.write_text(yaml.safe_dump({"plaintext": True, "models": {"m": spec}}))
    return path


def _edited(tmp_path: Path, artifact: Path, **manifest: object) -> Path:
    """A copy of ``artifact`` whose manifest says something else."""
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / artifact.name
    shutil.copytree(artifact, out)
    m = json.loads((out / "manifest.json").read_text())
    m.update(manifest)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_good_config_passes_with_a_summary(tmp_path, artifacts, capsys) -> None:
    rc, out, err = _check(_config(tmp_path, artifacts), capsys)
    assert rc == 0, err
    assert "model m: 2 detectors, fused fpr 0.01, inputs (1, 28, 28), 10 classes" in out
    assert "desvig: threshold" in out and "margin: threshold" in out
    assert out.strip().endswith(": OK")


def test_detectors_trained_for_other_inputs_are_refused(tmp_path, artifacts, capsys) -> None:
    desvig, margin = artifacts
    small = _edited(tmp_path, margin, input_shape=[1, 8, 8])
    rc, out, err = _check(_config(tmp_path, [desvig, small]), capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "detector artifacts disagree" in err and "(1, 8, 8)" in err and str(small) in err
    fewer = _edited(tmp_path, margin, classes=[str(i) for i in range(5)])
    rc, _, err = _check(_config(tmp_path, [desvig, fewer]), capsys)
    assert rc == 2 and "5 classes" in err and "Traceback" not in err


def test_a_reference_model_that_disagrees_is_refused(
    tmp_path, artifacts, example_model, capsys
) -> None:
    margin = artifacts[1]
    five = _edited(tmp_path, margin, classes=[str(i) for i in range(5)])
    cfg = _config(tmp_path, [five], reference_model=str(example_model))
    rc, _, err = _check(cfg, capsys)
    assert rc == 2
    assert "reference model" in err and "(10,) for 5 classes" in err
    wide = _edited(tmp_path, margin, input_shape=[3, 32, 32])
    rc, _, err = _check(_config(tmp_path, [wide], reference_model=str(example_model)), capsys)
    assert rc == 2 and "refuses an input of shape (3, 32, 32)" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "text, expect",
    [
        ("models: [", "openexample-controller check"),
        ("plaintext: true\nmodels: {m: {detectors: [/nowhere/at/all]}}", "/nowhere/at/all"),
        ("plaintext: true\nbudget_us: -3", "budget_us"),
    ],
)
def test_bad_configs_are_one_line(tmp_path, capsys, text: str, expect: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, out, err = _check(path, capsys)
    assert rc == 2 and out == ""
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_serve_refuses_what_check_refuses(tmp_path, artifacts) -> None:
    desvig, margin = artifacts
    cfg = _config(tmp_path, [desvig, _edited(tmp_path, margin, input_shape=[1, 8, 8])])
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "serve", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "detector artifacts disagree" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_agent_whose_model_does_not_fit_the_detectors_is_refused(controller) -> None:
    """A live daemon: FEATURES declaring the model id with 8x8 inputs, against detectors
    trained on 28x28: HELLO_FAILED/INCOMPATIBLE to the agent, a WARNING in the log."""
    from openexample import messages
    from openexample.v1 import openexample_pb2 as pb
    from tests.conftest import MODEL_ID
    from tests.peers import GrpcPeer, descriptor
    from tests.test_security import logged

    proc = controller()
    peer = GrpcPeer(proc.channel_as("agent/eight"))
    try:
        peer.recv("hello")
        peer.send(messages.hello("eight").SerializeToString())
        req = peer.recv("features_request")
        model = descriptor(MODEL_ID)
        model.input_shape[:] = [1, 8, 8]
        reply = pb.FeaturesReply(agent_id="eight", models=[model])
        peer.send(messages.reply(req, reply).SerializeToString())
        err = peer.recv("error").error
        assert (err.type, err.code) == (
            pb.ERROR_TYPE_HELLO_FAILED,
            pb.HELLO_FAILED_CODE_INCOMPATIBLE,
        )
        assert "(1, 8, 8)" in err.text and "(1, 28, 28)" in err.text
        assert logged(proc, "agent 'eight' refused at FEATURES: HELLO_FAILED/INCOMPATIBLE")
    finally:
        peer.close()


def test_a_model_id_without_detectors_is_named_in_the_log(controller) -> None:
    from tests.peers import GrpcPeer
    from tests.test_security import logged

    proc = controller()
    peer = GrpcPeer(proc.channel_as("agent/stem"))
    try:
        assert peer.handshake("stem", "model-file-stem").HasField("barrier_request")
        assert logged(
            proc,
            "agent 'stem' declares 'model-file-stem', for which this controller has no"
            " detectors (it has them for 'mnist-cnn')",
        )
    finally:
        peer.close()


def test_artifact_paths_are_relative_to_the_config_file(tmp_path, artifacts, capsys) -> None:
    """As the TLS paths: a config and its artifacts can move together."""
    folder = tmp_path / "deploy"
    (folder / "artifacts").mkdir(parents=True)
    local = []
    for a in artifacts:
        shutil.copytree(a, folder / "artifacts" / a.name)
        local.append(Path("artifacts") / a.name)
    cfg = folder / "controller.yaml"
    spec = {"detectors": [str(p) for p in local], "fpr": 0.01}
    cfg.write_text(yaml.safe_dump({"plaintext": True, "models": {"m": spec}}))
    rc, out, err = _check(cfg, capsys)  # the working directory is the repo, not deploy/
    assert rc == 0, err
    assert str(folder / "artifacts" / "desvig") in out


def test_artifacts_record_the_model_and_data_they_were_trained_with(
    tmp_path, example_model, capsys
) -> None:
    from controller.training.train import build_artifacts
    from openexample.digests import file_digest
    from tests.conftest import CACHE

    (path,) = build_artifacts(
        ["margin"], tmp_path / "set", dataset="mnist5k", model_path=example_model, cache=CACHE
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model_digest"] == file_digest(example_model)
    assert manifest["data_digest"].startswith("sha256:") and len(manifest["data_digest"]) == 71
    rc, out, err = _check(_config(tmp_path, [path]), capsys)
    assert rc == 0, err
    assert f"trained with model digest {file_digest(example_model)}" in out
