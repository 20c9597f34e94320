"""``openexample-agent``: put an existing model file behind a controller."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openexample-agent",
        description="Serve a model file with the OpenExample vigilance loop in between.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("attach", help="attach a model file to a controller and serve it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"openexample-agent {args.command}: not yet available", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
