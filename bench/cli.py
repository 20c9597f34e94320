"""``openexample-bench``: latency and detection benchmarks."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from controller.config import Config

CACHE = Path("var/cache")  # what the benches train: example model, detectors, attacks


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
    lat.add_argument(
        "--soak-s",
        type=float,
        help="agent memory run: INSPECT for this long, RSS sampled (default 5, --quick 2;"
        " 600 for the 10-minute check); 0 skips it",
    )
    d = sub.add_parser("demo", help="the main job on the embedded default (MNIST subset)")
    d.add_argument("--workdir", default="var/demo", help="journal, config and logs")
    d.add_argument("--agents", type=int, default=3)
    d.add_argument("--per-attack", type=int, default=60, help="inputs per attack per agent")
    d.add_argument(
        "--budget-us",
        type=int,
        default=Config().budget_us,
        help="INSPECT budget (default: the controller's; the paper's 350 is below a Python"
        " round trip with DeSVig on 2 cores)",
    )
    from bench.soak import add_arguments as soak_arguments

    soak_arguments(
        sub.add_parser("soak", help="N agents for T minutes: every call accounted for, RSS")
    )
    return p


def _cached_model() -> bool:
    folder = CACHE / "mnist5k"  # controller.training.example_model.ensure_example_model
    return (folder / "model.pt").is_file() and (folder / "model.json").is_file()


def _cached_detectors(names: tuple[str, ...]) -> bool:
    folder = CACHE / "artifacts" / "mnist5k" / "+".join(names)  # train.ensure_artifacts
    return all((folder / n / "manifest.json").is_file() for n in names)


def first_run_notice(args: argparse.Namespace) -> str | None:
    """One line saying what a latency or detection run must train before it measures
    anything, and for about how long (2 cores); None when everything is cached."""
    if args.command not in ("latency", "detection"):
        return None
    from controller.training.train import DEFAULT_DETECTORS

    todo: list[str] = []
    minutes = 0.0
    if not _cached_model():
        todo.append("the example model")
        minutes += 0.25
    sets = [tuple(DEFAULT_DETECTORS)]
    if args.command == "detection":
        from bench import detection

        sets = [detection._names(args), ("feature_squeezing",)]
    missing = [s for s in sets if not _cached_detectors(s)]
    if missing:
        todo.append("the detectors")
        minutes += sum(1.0 if "desvig" in s else 0.1 for s in missing)  # its CGAN
    if args.command == "detection":
        attacks = detection.untrained_attacks(args, CACHE)
        if attacks:
            todo.append(f"{len(attacks)} attack set{'s' * (len(attacks) > 1)}")
            minutes += (0.1 if args.quick else 0.5) * len(attacks)
    if not todo:
        return None
    what = ", ".join(todo[:-1]) + " and " + todo[-1] if len(todo) > 1 else todo[0]
    lo = max(1, round(minutes))  # measured on 2 shared cores; slower ones take longer
    hi = max(lo + 1, math.ceil(minutes * 2.5))
    return f"openexample-bench: first run: training {what} (~{lo}-{hi} min), cached under {CACHE}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.procs import exit_on_signals

    exit_on_signals()  # SIGTERM/SIGHUP: finally blocks stop every process the bench started
    notice = first_run_notice(args)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    if args.command == "demo":
        from bench.demo import run_demo

        return run_demo(args)
    if args.command == "detection":
        from bench.detection import run as run_detection

        return run_detection(args)
    if args.command == "latency":
        from bench.latency import run

        return run(args)
    if args.command == "soak":
        import json

        from bench.soak import run as run_soak

        report = run_soak(args)
        print(json.dumps(report, indent=2))
        return 0 if report["lost"] == 0 else 1
    print(f"openexample-bench {args.command}: not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
