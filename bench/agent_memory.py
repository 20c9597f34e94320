"""What an agent adds to the user's process, and whether it grows (``python -m
bench.agent_memory ADDRESS MODEL [--seconds S] [--tls-ca CA --tls-cert CERT --tls-key KEY
| --plaintext]``; run by ``openexample-bench latency``).

The user's process already holds torch and the model: RSS is read after loading them,
after ``attach`` (the I/O thread, the session, the tables), and then while INSPECT calls
run for ``--seconds``, sampled every ``--every`` seconds. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--every", type=float, default=2.0)
    p.add_argument("--controller-pid", type=int, default=0)
    p.add_argument("--tls-ca", default="", help="mTLS to the controller: its CA")
    p.add_argument("--tls-cert", default="", help="the agent's certificate (agent/NAME)")
    p.add_argument("--tls-key", default="")
    p.add_argument("--plaintext", action="store_true", help="no TLS (loopback only)")
    args = p.parse_args(argv)

    import torch

    from agents import attach
    from controller.reference_model import load_model
    from controller.training import datasets

    # Clean test images with a tiny jitter: distinct inputs (no RT hit), mostly benign,
    # as a production line sends them.
    clean = datasets.load("mnist5k").split().test.x

    load_model(args.model)(torch.zeros(1, 1, 28, 28))  # the user's model, warm
    gc.collect()
    base = rss_mb()
    g = attach(
        args.model,
        controller=args.address,
        model_id="mnist-cnn",
        input_shape=(1, 28, 28),
        budget_us=1_000_000,
        connect_timeout_s=60,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        plaintext=args.plaintext,
    )
    try:
        rng = np.random.default_rng(0)

        def next_input(i: int) -> np.ndarray:
            x = clean[i % len(clean)] + rng.uniform(0, 1e-3, clean.shape[1:])
            return np.clip(x, 0, 1).astype(np.float32)

        for i in range(200):  # warm: the first calls fill caches and the RT
            g(next_input(i))
        gc.collect()
        attached = rss_mb()
        samples, calls = [], 0
        t_end = time.monotonic() + args.seconds
        next_sample = time.monotonic()
        while time.monotonic() < t_end:
            g(next_input(calls))  # all distinct: every call inspected
            calls += 1
            if time.monotonic() >= next_sample:
                ctrl = rss_mb(args.controller_pid) if args.controller_pid else None
                samples.append((round(rss_mb(), 1), None if ctrl is None else round(ctrl, 1)))
                next_sample += args.every
        gc.collect()
        ctrl_end = rss_mb(args.controller_pid) if args.controller_pid else None
        samples.append((round(rss_mb(), 1), None if ctrl_end is None else round(ctrl_end, 1)))
    finally:
        g.close()
    print(
        json.dumps(
            {
                "agent_added_mb": round(attached - base, 1),
                "calls": calls,
                "seconds": args.seconds,
                # growth while serving: the last sample against the first
                "agent_growth_mb": round(samples[-1][0] - samples[0][0], 1),
                "controller_growth_mb": (
                    None if samples[0][1] is None else round(samples[-1][1] - samples[0][1], 1)
                ),
                "samples_mb": samples,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
