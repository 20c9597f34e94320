"""The Open Inference Protocol (KServe v2) of a guarded model: the codec's rules, wire
compatibility with Triton's protobuf, and the real ``tritonclient`` (gRPC and HTTP)
against a real agent CLI process guarding the example model for a real controller."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents import oip
from agents.results import Result
from tests.conftest import MODEL_ID
from tests.peers import SHAPE, serve_agent_cli

VIEW = oip.ModelView(
    name="m", input_shape=(1, 2, 2), input_dtype=np.dtype("float32"), n_classes=3, max_batch=4
)


def _result(verdict="benign", released=True, decided_by="controller", reason="", label=1):
    return Result(
        "m", "s", np.array([0.1, 0.7, 0.2], np.float32) if released else None,
        label, label, 0.7, verdict, decided_by, released, 250e-6, reason=reason,
    )  # fmt: skip


# ---- the codec ---------------------------------------------------------------------


def test_metadata_names_one_input_and_two_outputs():
    meta = VIEW.metadata()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 2, 2]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 3]),
        ("label", "INT64", [-1]),
    ]
    assert meta["versions"] == ["1"]


def test_inputs_decode_from_bytes_and_values_and_are_cast_to_the_model_dtype():
    x = np.arange(8, dtype=np.uint8).reshape(2, 1, 2, 2)
    a = VIEW.decode_input("input", "UINT8", [2, 1, 2, 2], x.tobytes())
    b = VIEW.decode_input("input", "INT64", [2, 1, 2, 2], x.tolist())  # nested values
    c = VIEW.decode_input("input", "FP64", [1, 1, 2, 2], [0.5, 1, 2, 3])
    assert a.dtype == b.dtype == c.dtype == np.float32
    assert a.shape == b.shape == (2, 1, 2, 2) and c.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(a, x.astype(np.float32))
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize(
    "args, message",
    [
        (("x", "FP32", [1, 1, 2, 2], [0.0] * 4), "unknown input 'x' (the model takes 'input')"),
        (("input", "FP8", [1, 1, 2, 2], [0.0] * 4), "datatype 'FP8'"),
        (("input", "FP32", [1, 2, 2, 1], [0.0] * 4), "shape [1, 2, 2, 1], the model takes"),
        (("input", "FP32", [1, 2, 2], [0.0] * 4), "shape [1, 2, 2], the model takes [-1, 1, 2, 2]"),
        (("input", "FP32", [5, 1, 2, 2], [0.0] * 20), "batch of 5 (1..4)"),
        (("input", "FP32", [0, 1, 2, 2], []), "batch of 0"),
        (("input", "FP32", [1, 1, 2, 2], b"\0" * 15), "15 bytes for shape [1, 1, 2, 2] of FP32"),
        (("input", "FP32", [1, 1, 2, 2], [0.0] * 3), "3 values for shape [1, 1, 2, 2]"),
        (("input", "FP32", [1, 1, 2, 2], ["a"] * 4), "data are not FP32 values"),
        (("input", "UINT8", [1, 1, 2, 2], [300] * 4), "data are not UINT8 values"),
        (("input", "FP32", [1, 1, 2, 2], [0.0, float("nan"), 0.0, 0.0]), "NaN or infinity"),
        (("input", "FP64", [1, 1, 2, 2], [1e300] * 4), "NaN or infinity (or out of range)"),
    ],
)
def test_bad_inputs_are_typed_errors_naming_the_problem(args, message):
    with pytest.raises(oip.OipError) as e:
        VIEW.decode_input(*args)
    assert e.value.kind == "invalid" and message in e.value.message


def test_too_many_elements_is_refused_before_decoding():
    view = oip.ModelView("m", (1, 2, 2), np.dtype("float32"), 3, max_batch=4, max_elements=7)
    with pytest.raises(oip.OipError, match="8 elements > 7"):
        view.decode_input("input", "FP32", [2, 1, 2, 2], b"\0" * 32)


def test_model_and_version_are_checked():
    VIEW.check_model("m")
    VIEW.check_model("m", "1")
    for name, version in (("other", ""), ("m", "2")):
        with pytest.raises(oip.OipError) as e:
            VIEW.check_model(name, version)
        assert e.value.kind == "not_found"


def test_outputs_asked_for_come_in_the_model_order():
    assert VIEW.requested([]) == ("logits", "label")
    assert VIEW.requested(["label", "logits"]) == ("logits", "label")
    assert VIEW.requested(["label"]) == ("label",)
    with pytest.raises(oip.OipError, match="unknown output 'probs'"):
        VIEW.requested(["probs"])


def test_released_answers_carry_the_decision_as_parameters():
    results = [_result(), _result("unknown", decided_by="timeout", reason="budget expired")]
    params, outputs = oip.answer(results, ("logits", "label"))
    assert params == {
        oip.VERDICT: "benign,unknown",
        oip.DECIDED_BY: "controller,timeout",
        oip.REASON: "budget expired",
        oip.RELEASED: True,
        oip.LATENCY: 250.0,
    }
    assert [(o.name, o.datatype, o.shape) for o in outputs] == [
        ("logits", "FP32", [2, 3]),
        ("label", "INT64", [2]),
    ]
    assert outputs[1].array.tolist() == [1, 1]


def test_one_withheld_input_fails_the_request_naming_each_withheld_input():
    results = [
        _result(),
        _result("adversarial", released=False),
        _result("unknown", released=False, decided_by="disconnected", reason="no controller"),
    ]
    with pytest.raises(oip.OipError) as e:
        oip.answer(results, ("logits",))
    assert e.value.kind == "withheld"
    assert e.value.message == (
        "withheld by the guard: input 1 adversarial (decided by controller); "
        "input 2 unknown (decided by disconnected: no controller)"
    )
    assert e.value.parameters[oip.RELEASED] is False
    assert e.value.parameters[oip.VERDICT] == "benign,adversarial,unknown"


# ---- wire compatibility --------------------------------------------------------------


def _fields(desc) -> dict:
    out = {}
    for f in desc.fields:
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            kind = ("map", _fields(sub.fields_by_name["value"].message_type))
        elif sub is not None:
            kind = ("message", _fields(sub))
        else:
            kind = f.type
        out[f.number] = (f.name, kind, f.is_repeated)
    return out


def test_messages_match_tritons_field_numbers_and_types():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from openexample.v1 import oip_pb2

    ours = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        for ours_t, theirs_t in (
            (method.input_type, other.input_type),
            (method.output_type, other.output_type),
        ):
            assert _fields(ours_t) == _fields(theirs_t), ours_t.name


# ---- real processes, real tritonclient -----------------------------------------------


@pytest.fixture
def guarded(controller, example_model):
    """A controller and an agent CLI serving the example model (gRPC and REST, mTLS)."""
    proc = controller()
    agent, port, http_port = serve_agent_cli(
        proc, str(example_model), "line-1", MODEL_ID, http=True
    )
    try:
        yield proc, port, http_port
    finally:
        agent.terminate()
        assert agent.wait(20) == 0


def _x(img: np.ndarray) -> np.ndarray:
    return np.array(img, np.float32).reshape(1, *SHAPE)  # a copy: fixtures are shared


def _wait(cond, timeout_s=20.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
def test_tritonclient_grpc_calls_the_guarded_model(guarded, mnist, fgsm):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    proc, port, _ = guarded
    files = proc.pki.issue("caller/plc-7", overwrite=False)
    client = tg.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        root_certificates=str(files.ca),
        private_key=str(files.key),
        certificate_chain=str(files.cert),
    )
    try:
        assert client.is_server_live()
        assert _wait(client.is_server_ready)
        assert client.is_model_ready(MODEL_ID)
        meta = client.get_model_metadata(MODEL_ID)
        assert meta.platform == "pytorch_libtorch"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input", "FP32", [-1, *SHAPE])
        ]

        def infer(x, **kw):
            inp = tg.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(MODEL_ID, [inp], **kw)

        clean, adv = fgsm
        res = infer(_x(clean[0]))
        params = res.get_response().parameters
        assert params[oip.VERDICT].string_param == "benign"
        assert params[oip.DECIDED_BY].string_param == "controller"
        assert params[oip.RELEASED].bool_param is True
        logits = res.as_numpy("logits")
        assert logits.shape == (1, 10)
        assert res.as_numpy("label").tolist() == [int(logits.argmax())]

        with pytest.raises(InferenceServerException) as e:  # an attack: withheld, loudly
            infer(_x(adv[0]))
        assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "withheld by the guard: input 0 adversarial (decided by" in e.value.message()

        with pytest.raises(InferenceServerException) as e:
            client.infer("other-model", [tg.InferInput("input", [1, *SHAPE], "FP32")])
        assert e.value.status() == "StatusCode.NOT_FOUND"
        nan = _x(clean[1])
        nan[0, 0, 0, 0] = np.nan
        with pytest.raises(InferenceServerException) as e:
            infer(nan)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "NaN or infinity" in e.value.message()
        with pytest.raises(InferenceServerException) as e:  # claims another source
            infer(_x(clean[1]), parameters={oip.SOURCE_PARAMETER: "plc-9"})
        assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "your certificate says caller/plc-7" in e.value.message()
        # after all that, the same caller is still served
        assert infer(_x(clean[2])).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()


@pytest.mark.integration
def test_tritonclient_http_calls_the_guarded_model(guarded, mnist, fgsm):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    proc, _, http_port = guarded
    files = proc.pki.issue("caller/plc-7", overwrite=False)
    ssl_options = {
        "ca_certs": str(files.ca),
        "certfile": str(files.cert),
        "keyfile": str(files.key),
    }
    client = th.InferenceServerClient(f"127.0.0.1:{http_port}", ssl=True, ssl_options=ssl_options)
    try:
        assert client.is_server_live()
        assert _wait(client.is_server_ready)
        assert client.is_model_ready(MODEL_ID)
        assert client.get_model_metadata(MODEL_ID)["inputs"][0]["shape"] == [-1, *SHAPE]
        clean, adv = fgsm

        for binary in (True, False):  # the binary extension, and plain JSON
            inp = th.InferInput("input", [2, *SHAPE], "FP32")
            inp.set_data_from_numpy(np.concatenate([_x(clean[0]), _x(clean[1])]), binary)
            out = [th.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label")]
            res = client.infer(MODEL_ID, [inp], outputs=out)
            params = res.get_response()["parameters"]
            assert params[oip.VERDICT] == "benign,benign"
            assert params[oip.RELEASED] is True
            logits = res.as_numpy("logits")
            assert logits.shape == (2, 10)
            assert res.as_numpy("label").tolist() == logits.argmax(1).tolist()

        inp = th.InferInput("input", [1, *SHAPE], "FP32")
        inp.set_data_from_numpy(_x(adv[0]))
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL_ID, [inp])
        assert e.value.status() == "403"
        assert "withheld by the guard: input 0 adversarial" in e.value.message()

        bad = th.InferInput("input", [1, 28, 28], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 28, 28), np.float32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL_ID, [bad])
        assert e.value.status() == "400" and "the model takes [-1, 1, 28, 28]" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("other-model")
        assert e.value.status() == "404"
    finally:
        client.close()


@pytest.mark.integration
def test_rest_refuses_callers_without_a_caller_certificate_and_junk_bodies(guarded, fgsm):
    import ssl
    import urllib.error
    import urllib.request

    proc, _, http_port = guarded
    url = f"https://127.0.0.1:{http_port}/v2/models/{MODEL_ID}/infer"

    def post(identity, body: bytes, headers=None):
        files = proc.pki.issue(identity, overwrite=False)
        ctx = ssl.create_default_context(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
        req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    image = _x(fgsm[0][3]).reshape(-1).tolist()
    one = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *SHAPE], "data": image}]}
    status, body = post("agent/line-2", json.dumps(one).encode())
    assert status == 403 and "takes caller/NAME certificates" in body["error"]
    assert post("caller/plc-7", b"{not json")[0] == 400
    assert post("caller/plc-7", b"[1, 2]")[1]["error"].startswith("request body: a JSON object")
    assert post("caller/plc-7", b"[" * 100_000)[1]["error"] == (
        "request body: JSON nested too deeply"
    )
    status, body = post("caller/plc-7", b"\xff\xfe")
    assert status == 400 and body["error"].startswith("request body: not JSON")
    header = json.dumps(one).encode()
    for length in ("-1", "x", str(len(header) + 1)):  # the binary extension's header length
        status, body = post("caller/plc-7", header, {"Inference-Header-Content-Length": length})
        assert status == 400 and "Inference-Header-Content-Length" in body["error"]
    status, body = post("caller/plc-7", json.dumps(one).encode())
    assert status == 200 and body["parameters"][oip.RELEASED] is True
    assert len(body["outputs"][0]["data"]) == 10
