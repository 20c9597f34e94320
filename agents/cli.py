"""``openexample-agent``: put an existing model file behind a controller, with no code.

    openexample-agent attach --model mnist.pt --controller 127.0.0.1:6653 \\
        --serve 0.0.0.0:7000 --input-shape 1,28,28 --budget-us 350

Serves ``openexample.v1.Predictor/Predict`` to end users with the vigilance loop in
between; SIGTERM / SIGINT stop it cleanly (in-flight calls finish, the session closes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agents.config import FAIL_MODES, AgentConfig
from openexample.errors import ConfigError

_DEFAULTS = AgentConfig()  # every default of an agent setting comes from here


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r} (e.g. 1,28,28)") from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad range {text!r} (e.g. 0,1)") from None
    return lo, hi


def _classes(text: str) -> list[str]:
    """Comma-separated names, or ``@FILE`` with one name per line."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).read_text().splitlines()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{text[1:]}: {exc.strerror}") from None
        return [ln.strip() for ln in lines if ln.strip()]
    return [c.strip() for c in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(
        prog="openexample-agent",
        description="Serve a model file with the OpenExample vigilance loop in between.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attach", help="attach a model file to a controller and serve it")
    a.add_argument("--model", required=True, help="TorchScript (.pt) or ONNX (.onnx) file")
    a.add_argument(
        "--controller",
        required=True,
        metavar="ADDRESS",
        help="HOST:PORT (gRPC), or the native channel: tcp://HOST:PORT, unix:///PATH",
    )
    a.add_argument("--serve", required=True, metavar="HOST:PORT", help="Predictor API address")
    a.add_argument("--model-id", help="model id declared to the controller (default: file stem)")
    a.add_argument("--agent-id", default=d.agent_id, help="agent id (default: host-pid-model)")
    a.add_argument(
        "--input-shape",
        type=_ints,
        default=d.input_shape,
        help="one input, no batch dim, e.g. 1,28,28 (default: from the model file)",
    )
    lo, hi = d.input_range
    a.add_argument(
        "--input-range", type=_range, default=d.input_range, help=f"lo,hi (default {lo:g},{hi:g})"
    )
    a.add_argument(
        "--classes", type=_classes, default=d.class_names, help="class names: a,b,c or @FILE"
    )
    a.add_argument(
        "--budget-us",
        type=int,
        default=d.budget_us,
        help="budget of the default table-miss rule until the controller sets its own "
        "(default %(default)s)",
    )
    a.add_argument(
        "--fail-mode",
        default=d.fail_mode,
        metavar="{" + ",".join(FAIL_MODES) + "}",
        help="what the default table-miss rule does without a verdict (default %(default)s)",
    )
    a.add_argument("--batch-window-us", type=int, default=d.batch_window_us)
    a.add_argument("--max-batch-items", type=int, default=d.max_batch_items)
    a.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="serve Prometheus metrics on this port (0 = any; default: none)",
    )
    a.add_argument(
        "--metrics-addr", default=d.metrics_addr, help="metrics address (default %(default)s)"
    )
    a.add_argument(
        "--privacy",
        default=d.privacy,
        metavar="laplace:EPS",
        help="local DP noise on what is sent (laplace:EPS or gaussian:EPS[:DELTA])",
    )
    a.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout_s,
        metavar="SECONDS",
        help="wait this long for the session before serving (default: do not wait)",
    )
    a.add_argument("--model-threads", type=int, default=min(4, os.cpu_count() or 1))
    a.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The AgentConfig the ``attach`` flags say (ConfigError on a bad value)."""
    return AgentConfig(
        controller=args.controller,
        model_id=args.model_id or Path(args.model).stem,
        agent_id=args.agent_id,
        input_shape=args.input_shape,
        class_names=args.classes,
        input_range=args.input_range,
        budget_us=args.budget_us,
        fail_mode=args.fail_mode,
        privacy=args.privacy,
        batch_window_us=args.batch_window_us,
        max_batch_items=args.max_batch_items,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        # 0 (the old way to say it) = do not wait
        connect_timeout_s=args.connect_timeout or None,
    )


async def _serve(args: argparse.Namespace, config: AgentConfig) -> int:
    from agents.guard import attach
    from agents.server import start_server

    if args.model_threads < 1:
        raise ConfigError(f"model_threads: must be > 0, got {args.model_threads}")
    executor = ThreadPoolExecutor(args.model_threads, thread_name_prefix="model")
    try:
        guard = attach(args.model, config, model_executor=executor)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    try:
        server, port = await start_server(guard, args.serve)
        host = args.serve.rsplit(":", 1)[0]
        print(f"openexample-agent: serving {guard.model_id} on {host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=2.0)
    finally:
        guard.close()
        executor.shutdown(wait=False, cancel_futures=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        import uvloop

        return uvloop.run(_serve(args, config))
    except (ConfigError, FileNotFoundError, ImportError, ValueError, OSError) as exc:
        # A local mistake (a flag, a file, an address): one line, no traceback.
        print(f"openexample-agent: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
