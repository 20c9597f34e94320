"""``openexample-controller``: run and operate the controller daemon."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openexample-controller",
        description="The OpenExample controller: vigilance rules, RT/FT and detectors.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon")
    sub.add_parser("rules", help="add, list and delete vigilance rules on a running daemon")
    sub.add_parser("train", help="train a detector artifact")
    sub.add_parser("demo", help="the main job on the embedded default (MNIST subset)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"openexample-controller {args.command}: not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
