"""What the activations channel costs (``python -m bench.activations_cost``).

For one inspected call of the example model (batch 1): the bytes of the PKG_IN envelope
on the wire without activations and with the feature-map detector's layers attached as
float32 or float16, and the ``featuremap`` detector's scoring time at batch 1 when the
agent sends the activations against when the controller computes them from its
reference copy (one torch thread, as the controller runs; median of ``-n`` calls).
The artifact is the one the detection bench trains (``--detectors
desvig,margin,featuremap``) unless ``--artifact`` names another.

It also times what an agent adds per inspected call: the model call alone against the
pass up to the layers that computes the activations (batch 1, median), for the
TorchScript model and, with ``--onnx``, its ONNX export (torch.onnx.export; the layers
as extra graph outputs, openexample/onnx_outputs.py).

``--calls N`` adds the end-to-end view: a real controller (mTLS, gRPC) with the
artifact's whole set, and agents running the example model, one sending the
activations (float16, as the controller asks) and one not (the controller computes
them), taking turns on fresh test images; with ``--onnx`` two more run the ONNX export.
It prints each one's Result.latency_s at p50 and p99 (microseconds) and the PKG_IN
bytes per inspected call it sent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from controller.activations import taps_for
from controller.detectors import Detector, make_batch
from controller.detectors.base import Batch
from controller.reference_model import model_fn
from controller.training import datasets
from openexample import messages, tensor
from openexample.v1 import openexample_pb2 as pb

ARTIFACT = Path("var/cache/artifacts/mnist5k/desvig+margin+featuremap/featuremap")


def pkg_in_bytes(x: np.ndarray, logits: np.ndarray, acts: dict[str, np.ndarray] | None) -> int:
    """Serialized size of one PKG_IN envelope for ``x`` (batch 1, typical item fields)."""
    item = pb.PkgInItem(
        label=int(logits.argmax()),
        confidence=0.9,
        source_id="plc-7",
        reason=pb.PKG_IN_REASON_TABLE_MISS,
        fingerprint=b"\x01" * 16,
        budget_us=10_000,
    )
    pkg = pb.PkgIn(model_id="mnist-cnn", inputs=tensor.encode(x), items=[item])
    pkg.logits.CopyFrom(tensor.encode(logits))
    for name, a in (acts or {}).items():
        pkg.activations.add(name=name, tensor=tensor.encode(a))
    return len(messages.envelope(pkg, xid=7).SerializeToString())


def median_us(fn: Callable[[], object], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=str(ARTIFACT), help="a featuremap artifact folder")
    ap.add_argument("--model", help="the reference model (default: the artifact's)")
    ap.add_argument("-n", type=int, default=500, help="scoring calls to time")
    ap.add_argument("--calls", type=int, default=0, help="end to end: calls per agent")
    ap.add_argument("--onnx", action="store_true", help="also agents running an ONNX export")
    args = ap.parse_args(argv)
    path = Path(args.artifact)
    if not (path / "manifest.json").is_file():
        print(
            f"activations_cost: no featuremap artifact at {path}; run openexample-bench"
            " detection --detectors desvig,margin,featuremap first, or give --artifact",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(1)
    det = Detector.load(path)
    det.model = model_fn(args.model or det.meta.get("model") or "var/cache/mnist5k/model.pt")
    x = datasets.load("mnist5k").split().test.x[:1]
    b = make_batch(x, det.model)
    acts = taps_for(det.model, det.layers).numpy(x)
    half = {n: a.astype(np.float16) for n, a in acts.items()}
    sizes = {
        "none": pkg_in_bytes(x, b.logits, None),
        "float32": pkg_in_bytes(x, b.logits, acts),
        "float16": pkg_in_bytes(x, b.logits, half),
    }
    sent = Batch(b.inputs, b.logits, b.labels, half)
    computed_us = median_us(lambda: det.score(b), args.n)
    sent_us = median_us(lambda: det.score(sent), args.n)
    shapes = ", ".join(f"{n} {tuple(a.shape[1:])}" for n, a in acts.items())
    print(f"layers: {shapes}")
    for k, v in sizes.items():
        print(f"PKG_IN bytes, batch 1, activations {k}: {v}")
    print(
        f"featuremap score, batch 1, activations computed by the controller: {computed_us:.0f} us"
    )
    print(f"featuremap score, batch 1, activations sent (float16): {sent_us:.0f} us")
    model = Path(args.model or det.meta.get("model") or "var/cache/mnist5k/model.pt")
    with tempfile.TemporaryDirectory() as tmp:
        models = {"torchscript": model}
        if args.onnx:
            models["onnx"] = export_onnx(model, Path(tmp) / "model.onnx")
        for kind, file in models.items():
            call_us, acts_us = agent_cost(file, det.layers, x, args.n)
            print(
                f"agent, {kind}, batch 1: model call {call_us:.0f} us, activations (one more"
                f" pass up to the layers) {acts_us:.0f} us"
            )
        if args.calls:
            end_to_end(path.parent, models, det.layers, args.calls)
    return 0


def export_onnx(model: Path, path: Path) -> Path:
    """The TorchScript example model as ONNX (torch's exporter, dynamo; any batch size)."""
    import logging
    import warnings

    from controller.reference_model import load_model
    from controller.training.example_model import SmallCNN

    net = SmallCNN(10)
    net.load_state_dict(load_model(model).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(net.eval(), (torch.zeros(2, 1, 28, 28),), str(path), dynamo=True,
                          verbose=False, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    return path


def agent_cost(model: Path, layers: list[str], x: np.ndarray, n: int) -> tuple[float, float]:
    """(model call, activations) medians in us on the agent's own model wrapper."""
    from agents.models import wrap_model

    adapter = wrap_model(str(model), input_shape=(1, 28, 28))
    acts = adapter.activations_fn(layers)
    return median_us(lambda: adapter.predict(x), n), median_us(lambda: acts(x), n)


def end_to_end(folder: Path, models: dict[str, Path], layers: list[str], n: int) -> None:
    """Agents on one controller, per model file with and without activations, taking turns."""
    from agents import attach
    from bench.demo import MODEL_ID, start_controller
    from bench.quick_latency import _fresh, alternate

    calibration = json.loads((folder / "calibration.json").read_text())
    arts = [folder / name for name in calibration["detectors"]]  # the set trained together
    x = datasets.load("mnist5k").split().test.x
    runs = [(k, f, a) for k, f in models.items() for a in ((), tuple(layers))]
    fresh = _fresh(x, len(runs) * n, seed=11)  # each agent its own: no RT entry of another's
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_controller(Path(tmp), arts, 1_000_000)
        guards = {}
        try:
            for kind, file, acts in runs:
                name = f"{kind} {'with' if acts else 'without'}"
                tls = proc.agent_tls(f"cost-{kind}-{len(acts)}")
                guards[name] = attach(str(file), controller=proc.address, model_id=MODEL_ID,
                                      input_shape=(1, 28, 28), connect_timeout_s=30,
                                      activations=acts, **tls)  # fmt: skip
                for i in range(20):
                    guards[name](x[i])
            sent = {k: (g.core.counters.pkg_in_bytes, g.core.counters.pkg_in_items)
                    for k, g in guards.items()}  # fmt: skip
            calls = {
                k: (lambda i, g=g, at=j * n: g(fresh[at + i]))
                for j, (k, g) in enumerate(guards.items())
            }
            for k, rs in alternate(calls, n).items():
                us = np.array([r.latency_s for r in rs if r.decided_by == "controller"]) * 1e6
                c = guards[k].core.counters
                per = (c.pkg_in_bytes - sent[k][0]) / max(1, c.pkg_in_items - sent[k][1])
                print(
                    f"agent {k} activations: p50 {np.percentile(us, 50):.0f} us, p99"
                    f" {np.percentile(us, 99):.0f} us over {len(us)} calls the controller"
                    f" decided; {per:.0f} PKG_IN bytes per inspected call"
                )
        finally:
            for g in guards.values():
                g.close()
            proc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
