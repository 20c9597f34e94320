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
        s.add_argument(
            "--model",
            help="your own TorchScript or ONNX model instead of the example one: the default"
            " detector set is trained for it first (cached by the file's digest)"
            + (
                "; an ONNX model is attacked with black-box attacks"
                if name == "detection"
                else "; it must take mnist5k inputs (1x28x28, 10 classes)"
            ),
        )
    det = sub.choices["detection"]
    det.add_argument(
        "--detectors",
        help="the fused pipeline: detector names, comma-separated, or a named set (default,"
        " hardened: with its own FPR shares); default: the default set",
    )
    det.add_argument(
        "--fpr-shares",
        metavar="NAME=SHARE,...",
        help="each detector's part of the FPR budget (every one of --detectors named once,"
        " summing to 1, e.g. robust=0.6,desvig=0.2,margin=0.2; default: even); the fused"
        " rows are then measured with these shares and, beside them, with even ones",
    )
    det.add_argument(
        "--calibrate-on",
        choices=("all", "right"),
        default=None,
        help="the clean calibration inputs that set the thresholds: all or right (those"
        " the model classifies correctly: the FPR target then bounds false alarms on correct"
        " outputs); default: the --detectors set's own, right for hardened, all for the"
        " others (--table-iv's sets use the run's); the report gives clean test inputs"
        " flagged both ways",
    )
    det.add_argument(
        "--table-iv",
        metavar="SETS",
        help="Table IV's defences: detector sets separated by ';' (e.g."
        " 'feature_squeezing;magnet;desvig;default'), each its own controller run"
        " (default: the pipeline of --detectors)",
    )
    det.add_argument(
        "--adaptive",
        action="store_true",
        help="instead: adaptive white-box attacks that know every detector (bench/adaptive.py),"
        " success judged by the deployed pipeline; writes var/bench/adaptive",
    )
    det.add_argument(
        "--adaptive-n", type=int, default=200, metavar="N", help="images the adaptive attacks try"
    )
    det.add_argument(
        "--adaptive-from",
        type=int,
        default=0,
        metavar="I",
        help="the first test image they try (default 0): other images than a setting was chosen on",
    )
    det.add_argument(
        "--adaptive-budgets",
        metavar="NORM:EPS,...",
        help="the balls attacked (default linf:0.1,linf:0.2,linf:0.3,l2:2,l2:3)",
    )
    det.add_argument(
        "--adaptive-steps", type=int, default=200, metavar="N", help="PGD steps per run (200)"
    )
    det.add_argument(
        "--adaptive-targets",
        type=int,
        default=3,
        metavar="N",
        help="wrong labels tried per image (default 3; at most the classes less one)",
    )
    det.add_argument(
        "--adaptive-kappa",
        type=float,
        default=6.0,
        metavar="K",
        help="the logit margin the attack aims for over every other class (default 6)",
    )
    det.add_argument(
        "--adaptive-weights",
        default="0.1,1,10",
        metavar="W,...",
        help="detector-hinge weights tried per target after the detector-unaware run"
        " (default 0.1,1,10)",
    )
    det.add_argument(
        "--table-iv-n",
        type=int,
        default=100,
        metavar="N",
        help="Table IV's feed: images per deployment and input set (default 100, as the paper)",
    )
    det.add_argument(
        "--attacks",
        help="only these attacks, by table label (e.g. 'FGSM eps=0.1,PGD eps=0.3,DeepFool';"
        " default: all of the run; CW-Linf alone takes ~15 min at n=1000 on 2 cores)",
    )
    det.add_argument(
        "--dataset",
        help="the data set the model was trained on (default mnist5k; also digits, idx:DIR,"
        " folder:DIR): detectors are fitted on its train split, measured on its test split",
    )
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
    sub.add_parser(  # its own flags: bench/privacy.py (main hands them over)
        "privacy", add_help=False, help="privacy noise against detection, per epsilon"
    )
    return p


def _dataset(args: argparse.Namespace) -> str:
    return getattr(args, "dataset", None) or "mnist5k"


def _cached_model(args: argparse.Namespace) -> bool:
    if args.model:  # the user's own: nothing to train
        return True
    from controller.training.example_model import _slug

    folder = CACHE / _slug(_dataset(args))  # example_model.ensure_example_model
    return (folder / "model.pt").is_file() and (folder / "model.json").is_file()


def _cached_detectors(
    args: argparse.Namespace, names: tuple[str, ...], shares: tuple[float, ...] | None = None
) -> bool:
    from controller.training.train import artifact_is_current, artifacts_folder

    folder = artifacts_folder(
        names, dataset=_dataset(args), cache=CACHE, model=args.model, shares=shares
    )
    return all(artifact_is_current(folder / n) for n in names)


def preflight(args: argparse.Namespace) -> str | None:
    """For a latency or detection run: what would make it fail before it measures
    anything (an unknown detector in ``--detectors``; with ``--model`` or ``--dataset``, a
    missing or unreadable model file, an ONNX one for latency or with detectors that need
    its gradients, one that refuses the data set's inputs or classes, a data set that does
    not load), in one line; else None."""
    if args.command not in ("latency", "detection"):
        return None
    from controller.training.train import detector_set

    names = []
    try:
        names += detector_set(args.detectors)[0] if getattr(args, "detectors", None) else ()
        for part in (getattr(args, "table_iv", None) or "").split(";"):
            names += detector_set(part)[0] if part.strip() else ()
    except ValueError as exc:
        return f"--detectors: {exc}"
    if any(names):
        from controller import detectors

        for name in filter(None, names):
            try:
                detectors.get(name)
            except (KeyError, ValueError) as exc:
                return f"--detectors: {exc}"
    if getattr(args, "fpr_shares", None):
        from bench.detection import _names
        from controller.training.train import parse_fpr_shares

        try:
            parse_fpr_shares(args.fpr_shares, _names(args))
        except ValueError as exc:
            return f"--fpr-shares: {exc}"
    if getattr(args, "adaptive", False):
        if args.adaptive_n < 1:
            return f"--adaptive-n must be at least 1, got {args.adaptive_n}"
        if args.adaptive_from < 0:
            return f"--adaptive-from must be at least 0, got {args.adaptive_from}"
        from bench.adaptive import attack_budgets

        try:
            attack_budgets(args)
        except ValueError as exc:
            return str(exc)
        if args.adaptive_from > 0:
            from controller.training import datasets

            dataset = getattr(args, "dataset", None) or "mnist5k"
            try:
                size = len(datasets.load(dataset).split(seed=0).test.x)
            except Exception:  # an unknown data set: the run says so in its own words
                size = None
            if size is not None and args.adaptive_from >= size:
                return f"--adaptive-from {args.adaptive_from}: the test split has {size} images"
        if args.model and Path(args.model).suffix.lower() == ".onnx":
            return (
                f"--adaptive: {args.model} is ONNX, and white-box attacks need the model's"
                " gradients: give a TorchScript copy"
                " (torch.jit.save(torch.jit.script(model), PATH))"
            )
    if getattr(args, "table_iv_n", 1) < 1:
        return f"--table-iv-n must be at least 1, got {args.table_iv_n}"
    if getattr(args, "attacks", None):
        from bench.detection import select_attacks

        try:
            select_attacks(args)
        except ValueError as exc:
            return f"--attacks: {exc}"
    if args.model is None and getattr(args, "dataset", None) is None:
        return None
    from controller.training.train import check_model

    detection = args.command == "detection"
    if detection:  # what the run trains: its set (or default), Table IV's, the baseline
        from bench.detection import _names

        names += [*_names(args), "feature_squeezing"]
    problem = check_model(_dataset(args), args.model, list(filter(None, names)))
    if problem and args.command == "latency" and "the data set's" in problem:
        problem += " (the latency bench sends mnist5k inputs: 1x28x28, 10 classes)"
    return problem


def first_run_notice(args: argparse.Namespace) -> str | None:
    """One line saying what a latency or detection run must train before it measures
    anything, and for about how long (2 cores); None when everything is cached."""
    if args.command not in ("latency", "detection"):
        return None
    from controller.training.train import DEFAULT_DETECTORS

    todo: list[str] = []
    minutes = 0.0
    if not _cached_model(args):
        todo.append("the example model")
        minutes += 0.25
    sets = [tuple(DEFAULT_DETECTORS)]
    if args.command == "detection":
        from bench import detection

        sets = [detection._names(args), ("feature_squeezing",)]
    shares = {sets[0]: detection._shares(args)} if args.command == "detection" else {}
    missing = [s for s in sets if not _cached_detectors(args, s, shares.get(s))]
    if missing:
        todo.append("the detectors")
        minutes += sum(1.0 if "desvig" in s else 0.1 for s in missing)  # its CGAN
    if args.command == "detection" and not args.adaptive:
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["privacy"]:
        from bench.privacy import main as privacy_main

        return privacy_main(argv[1:], prog="openexample-bench privacy")
    args = build_parser().parse_args(argv)
    problem = preflight(args)  # before anything is started or trained
    if problem is not None:
        print(f"openexample-bench {args.command}: {problem}", file=sys.stderr)
        return 2
    from bench.procs import exit_on_signals

    exit_on_signals()  # SIGTERM/SIGHUP: finally blocks stop every process the bench started
    notice = first_run_notice(args)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    if args.command == "demo":
        from bench.demo import run_demo

        return run_demo(args)
    if args.command == "detection" and args.adaptive:
        from bench.adaptive import run as run_adaptive

        if args.out == "var/bench/detection":
            args.out = "var/bench/adaptive"
        return run_adaptive(args)
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
