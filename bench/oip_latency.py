"""What each model API of ``openexample-agent attach --serve`` costs a caller
(``python -m bench.oip_latency``).

Starts a controller and the agent CLI (gRPC ``--serve`` and REST ``--serve-http``, both
mTLS) guarding the example model, and times one-input calls from a ``caller/bench``
certificate, round trip at the caller, in turns of 50 so every API sees the machine in
the same state:

- ``Predict`` (openexample.v1.Predictor, grpcio stub);
- the Open Inference Protocol with tritonclient, gRPC and HTTP (binary tensors);

under an ALLOW rule (the API and the model only: no controller in the path) and under
the default INSPECT rule (the whole vigilance loop). Prints median and p99 microseconds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from bench.procs import ROOT, ControllerProcess, spawn, stop_group
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from openexample import grpc_tls, rules, tensor
from openexample.tls import TlsFiles
from openexample.v1 import admin_pb2, admin_pb2_grpc, predict_pb2, predict_pb2_grpc
from openexample.v1 import openexample_pb2 as pb

MODEL_ID = "mnist-cnn"


def _serve(proc: ControllerProcess, model: Path) -> tuple:
    files = proc.agent_tls("oip-bench")
    args = ["attach", "--model", str(model), "--controller", proc.address]
    args += ["--serve", "127.0.0.1:0", "--serve-http", "127.0.0.1:0", "--model-id", MODEL_ID]
    args += ["--input-shape", "1,28,28", "--connect-timeout", "30"]
    args += ["--tls-ca", files["tls_ca"], "--tls-cert", files["tls_cert"]]
    args += ["--tls-key", files["tls_key"]]
    agent = spawn("agents.cli", *args, cwd=ROOT, stdout=-1, stderr=-2, text=True)
    for line in agent.stdout:
        m = re.search(r"serving model id .*? on [^\s,]+:(\d+), REST on \S+:(\d+)\s*$", line)
        if m:
            return agent, int(m[1]), int(m[2])
    stop_group(agent)
    raise SystemExit("oip_latency: the agent CLI did not start serving")


def _callers(files: TlsFiles, port: int, http_port: int) -> dict[str, Callable]:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    creds = grpc_tls.grpc_channel_credentials(files)
    stub = predict_pb2_grpc.PredictorStub(grpc.secure_channel(f"127.0.0.1:{port}", creds))
    g = tg.InferenceServerClient(
        f"127.0.0.1:{port}",
        ssl=True,
        root_certificates=str(files.ca),
        private_key=str(files.key),
        certificate_chain=str(files.cert),
    )
    h = th.InferenceServerClient(
        f"127.0.0.1:{http_port}",
        ssl=True,
        ssl_options={
            "ca_certs": str(files.ca),
            "certfile": str(files.cert),
            "keyfile": str(files.key),
        },
    )

    def predict(v: np.ndarray) -> object:
        return stub.Predict(predict_pb2.PredictRequest(input=tensor.encode(v)), timeout=30)

    def kserve_grpc(v: np.ndarray) -> object:
        inp = tg.InferInput("input", list(v.shape), "FP32")
        inp.set_data_from_numpy(v)
        return g.infer(MODEL_ID, [inp])

    def kserve_rest(v: np.ndarray) -> object:
        inp = th.InferInput("input", list(v.shape), "FP32")
        inp.set_data_from_numpy(v)
        return h.infer(MODEL_ID, [inp])

    return {
        "Predict (gRPC)": predict,
        "KServe v2 gRPC (tritonclient)": kserve_grpc,
        "KServe v2 REST (tritonclient)": kserve_rest,
    }


def _call(f: Callable, v: np.ndarray) -> None:
    """One call; a withheld answer (about 1% of clean inputs are flagged) is an answer."""
    try:
        f(v)
    except Exception as exc:
        if "withheld by the guard" not in str(exc):
            raise


def _time(callers: dict[str, Callable], x: np.ndarray, n: int) -> dict[str, list[float]]:
    """Every call sends a new input (a test image with its own faint jitter), so INSPECT
    reaches the controller each time instead of the RT."""
    rng = np.random.default_rng(len(x))
    out: dict[str, list[float]] = {k: [] for k in callers}
    k = 0

    def fresh() -> np.ndarray:
        nonlocal k
        k += 1
        v = x[k % len(x)] + rng.uniform(0, 1e-3, x.shape[1:]).astype(np.float32)
        return np.clip(v, 0, 1)[None]

    for f in callers.values():  # warm up every connection
        for _ in range(20):
            _call(f, fresh())
    for _ in range(n // 50):
        for name, f in callers.items():
            for _ in range(50):
                v = fresh()
                t0 = time.perf_counter()
                _call(f, v)
                out[name].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000, help="calls per API and rule")
    ap.add_argument("--cache", default="var/cache")
    args = ap.parse_args(argv)
    model = ensure_example_model(Path(args.cache))
    from controller.training.train import ensure_artifacts

    artifacts = ensure_artifacts(cache=Path(args.cache))
    proc = ControllerProcess(
        (ROOT / "var/bench/oip_latency").resolve(),
        {
            "budget_us": 1_000_000,
            "trace_min_adversarial": 10**9,
            "models": {MODEL_ID: {"detectors": [str(p.resolve()) for p in artifacts]}},
        },
    ).start()
    agent = None
    try:
        agent, port, http_port = _serve(proc, model)
        files = proc.pki.issue("caller/bench", overwrite=False)
        x = np.array(datasets.load("mnist5k").split().test.x, np.float32)
        callers = _callers(files, port, http_port)
        admin = admin_pb2_grpc.ControllerAdminStub(proc.channel_as("operator/bench"))
        print("| API | rule | p50 us | p99 us |\n|---|---|---|---|")
        for rule in ("ALLOW", "INSPECT"):
            if rule == "ALLOW":  # every call released by the rule: the API and the model
                allow = rules.parse_action("allow", 0)
                mod = rules.vigilance_mod(
                    "add", match=pb.Match(), priority=500, actions=[allow], cookie=0xB0
                )
                admin.ModRules(admin_pb2.ModRulesRequest(mod=mod), timeout=10)
            else:
                mod = rules.vigilance_mod(
                    "delete_strict", match=pb.Match(), priority=500, cookie=0xB0
                )
                admin.ModRules(admin_pb2.ModRulesRequest(mod=mod), timeout=10)
            time.sleep(0.5)  # the rule change reaches the agent
            for name, ts in _time(callers, x, args.n).items():
                ts.sort()
                p50, p99 = statistics.median(ts) * 1e6, ts[int(0.99 * len(ts))] * 1e6
                print(f"| {name} | {rule} | {p50:.0f} | {p99:.0f} |")
    finally:
        if agent is not None:
            stop_group(agent)
        proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
