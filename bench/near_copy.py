"""Near-copy refusal, measured (``python -m bench.near_copy``).

Fills an agent's RT with the ADVERSARIAL entries the controller would push for attacks
on the example model (FGSM, PGD at eps 0.3 and FGSM 0.1, on the first half of the test
split), then reports, per radius:

- the share of re-perturbed copies of those attacks the agent refuses from the RT
  (Gaussian noise sigma 0.01 / 0.02 / 0.05, one pixel flipped, re-quantised to 8 bits,
  re-encoded as JPEG quality 90): what an attacker who re-sends with a twist gets;
- false refusals: clean inputs of the second half of the test split refused because
  an attack with the same label is within the radius;
- the cost on the agent: ``AgentCore.decide`` for an inspected input that misses the
  exact RT (the path every new input takes), median and p99 in microseconds, against
  radius 0 (exact fingerprints only) in the same run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np

from agents.config import AgentConfig
from agents.core import AgentCore
from agents.results import ModelInfo, Ticket
from bench.attacks import AttackSpec, classifier, generate
from controller.reference_model import model_fn
from controller.training import datasets
from controller.training.example_model import ensure_example_model
from openexample.messages import envelope, hello
from openexample.perceptual import perceptual
from openexample.tables import fingerprint, label_entry, rt_push
from openexample.v1 import openexample_pb2 as pb

ATTACKS = (
    AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.3}, eps=0.3),
    AttackSpec("FGSM", "FastGradientMethod", {"eps": 0.1}, eps=0.1),
    AttackSpec(
        "PGD",
        "ProjectedGradientDescent",
        {"eps": 0.3, "eps_step": 0.01, "max_iter": 40, "num_random_init": 1},
        eps=0.3,
    ),
)


def _jpeg(x: np.ndarray, quality: int = 90) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray((img[0] * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out[i, 0] = np.asarray(Image.open(buf), np.float32) / 255
    return out


def variants(adv: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    one = adv.copy()
    rows, cols = rng.integers(0, adv.shape[-2], len(adv)), rng.integers(0, adv.shape[-1], len(adv))
    one[np.arange(len(adv)), 0, rows, cols] = 1.0 - one[np.arange(len(adv)), 0, rows, cols]
    out = {
        f"noise {s}": np.clip(adv + rng.normal(0, s, adv.shape), 0, 1).astype(np.float32)
        for s in (0.01, 0.02, 0.05)
    }
    out["one pixel"] = one
    out["8-bit"] = (np.round(adv * 255) / 255).astype(np.float32)
    out["JPEG q90"] = _jpeg(adv)
    return out


def agent(radius: int, shape: tuple[int, ...], classes: int) -> AgentCore:
    info = ModelInfo("m", shape, tuple(str(i) for i in range(classes)))
    core = AgentCore("bench", [info], AgentConfig(near_copy_radius=radius, seed=0), now=0.0)
    core.connected(0.0)
    core.receive(hello("ctrl").SerializeToString(), 0.0)
    core.receive(envelope(pb.FeaturesRequest(), xid=7).SerializeToString(), 0.0)
    core.receive(envelope(pb.BarrierRequest(), xid=8).SerializeToString(), 0.0)
    return core


def push(core: AgentCore, adv: np.ndarray, labels: np.ndarray) -> None:
    entries = []
    for a, y in zip(adv, labels, strict=True):
        key, sketch = perceptual(a)
        entries.append(
            label_entry(
                fingerprint(a), int(y), pb.VERDICT_ADVERSARIAL, near_key=key, near_sketch=sketch
            )
        )
    for i in range(0, len(entries), 256):
        mod = envelope(rt_push("m", entries[i : i + 256]))
        core.receive(mod.SerializeToString(), 0.0)


def refused(core: AgentCore, xs: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> float:
    n = 0
    for x, y, row in zip(xs, labels, logits, strict=True):
        r, _ = core.decide("m", x, row, int(y), 0.9, "", 0.0)
        n += r.__class__ is not Ticket and not r.released
    core.flush(0.0)  # the inspected ones: out of the outbox, never answered
    return n / max(len(xs), 1)


def decide_us(core: AgentCore, xs: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    times = []
    for k in range(3000):
        i = k % len(xs)
        t0 = time.perf_counter()
        core.decide("m", xs[i], logits[i], int(labels[i]), 0.9, "", 0.0)
        times.append(time.perf_counter() - t0)
        if k % 50 == 49:
            core.flush(0.0)
    times.sort()
    return {
        "p50_us": round(statistics.median(times) * 1e6, 2),
        "p99_us": round(times[int(0.99 * len(times))] * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="var/cache")
    ap.add_argument("--radii", default="0,2,4,6")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    model_path = ensure_example_model(cache)
    predict = model_fn(model_path)
    test = datasets.load("mnist5k").split().test
    half = len(test.x) // 2
    x, clean = test.x[:half], test.x[half:]
    clf = classifier(model_path, x.shape[1:], 10)
    adv = np.concatenate([generate(s, clf, model_path, x, cache) for s in ATTACKS])
    labels = predict(adv).argmax(1)
    ok = labels != np.tile(test.y[:half], len(ATTACKS))  # successful attacks only
    adv, labels = adv[ok], labels[ok]
    rng = np.random.default_rng(0)
    copies = variants(adv, rng)
    clean_logits = predict(clean)
    clean_labels = clean_logits.argmax(1)
    print(f"{len(adv)} successful adversarials in the RT; {len(clean)} clean inputs held out")
    head = ["radius", *copies, "clean refused", "decide p50 us", "p99 us"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for radius in (int(r) for r in args.radii.split(",")):
        core = agent(radius, x.shape[1:], 10)
        push(core, adv, labels)
        shares = [refused(core, v, labels, predict(v)) for v in copies.values()]
        false = refused(core, clean, clean_labels, clean_logits)
        cost = decide_us(core, clean, clean_logits, clean_labels)
        cells = [f"{s:.3f}" for s in shares] + [f"{false:.3f}", str(cost["p50_us"])]
        print(f"| {radius} | " + " | ".join(cells) + f" | {cost['p99_us']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
