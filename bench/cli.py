"""``openexample-bench``: latency and detection benchmarks."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openexample-bench", description="OpenExample latency and detection benchmarks."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("latency", "latency scenarios"), ("detection", "detection figures")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--json", help="write results as JSON to this path")
        s.add_argument("--out", default=f"var/bench/{name}", help="folder for tables and plots")
        s.add_argument("--quick", action="store_true", help="a short smoke run (< 2 min)")
        s.add_argument("--seed", type=int, default=0)
    det = sub.choices["detection"]
    det.add_argument("--detectors", help="the fused pipeline (default: the trained default set)")
    lat = sub.choices["latency"]
    lat.add_argument("--agents", default="1,4,16,64", help="concurrent agent counts")
    lat.add_argument("--scenarios", help="comma-separated subset of the scenarios")
    lat.add_argument("--requests", type=int, help="timed requests per run (split over agents)")
    lat.add_argument("--no-saturation", action="store_true", help="skip the saturation run")
    d = sub.add_parser("demo", help="the main job on the embedded default (MNIST subset)")
    d.add_argument("--workdir", default="var/demo", help="journal, config and logs")
    d.add_argument("--agents", type=int, default=3)
    d.add_argument("--per-attack", type=int, default=60, help="inputs per attack per agent")
    d.add_argument(
        "--budget-us",
        type=int,
        default=20_000,
        help="INSPECT budget; the paper's 350 is below a Python gRPC round trip on 2 cores",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from bench.demo import run_demo

        return run_demo(args)
    if args.command == "detection":
        from bench.detection import run as run_detection

        return run_detection(args)
    if args.command == "latency":
        from bench.latency import run

        return run(args)
    print(f"openexample-bench {args.command}: not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
