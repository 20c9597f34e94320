"""``openexample-agent``: put an existing model file behind a controller, with no code.

    openexample-agent attach --model mnist.pt --controller ctl.example:6653 \\
        --tls-ca pki/ca.crt --tls-cert pki/agent-plc-1.crt --tls-key pki/agent-plc-1.key \\
        --serve 0.0.0.0:7000 --input-shape 1,28,28 --budget-us 350

Serves the model to end users with the vigilance loop in between, on ``--serve``:
``openexample.v1.Predictor/Predict`` and the Open Inference Protocol (KServe v2,
``inference.GRPCInferenceService``, what tritonclient's gRPC client calls); with
``--serve-http`` also its REST side (``/v2/...``). SIGTERM / SIGINT stop it cleanly
(in-flight calls finish, the session closes).

Both sides are mTLS by default with the agent's one certificate (``agent/<id>``: the
agent id is its name): to the controller, and for the model APIs, whose callers
present ``caller/<name>`` certificates from the same CA (the name is their source id;
see :mod:`agents.server`). ``--plaintext`` (controller on loopback or unix:// only),
``--serve-plaintext`` (model APIs on loopback only) and ``--serve-no-client-auth`` turn
parts of that off, each logged as a WARNING.
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
from openexample.addresses import parse_address
from openexample.errors import ConfigError
from openexample.tls import TlsFiles, check_plaintext

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
        help="HOST:PORT (gRPC), or the native channel: tcp://HOST:PORT, unix:///PATH;"
        " several separated by commas for failover, tried in that order",
    )
    a.add_argument(
        "--serve",
        required=True,
        metavar="HOST:PORT",
        help="gRPC address of the model APIs: Predict and KServe v2 (GRPCInferenceService)",
    )
    a.add_argument(
        "--serve-http",
        metavar="HOST:PORT",
        help="also serve KServe v2 over HTTP/REST (/v2/...) here (same TLS as --serve)",
    )
    a.add_argument("--model-id", help="model id declared to the controller (default: file stem)")
    a.add_argument(
        "--agent-id",
        default=d.agent_id,
        help="agent id (default: the name in --tls-cert; with --plaintext host-pid-model)",
    )
    t = a.add_argument_group("TLS (mTLS with the controller, and for Predict)")
    t.add_argument("--tls-ca", default=d.tls_ca, metavar="PEM", help="CA that signs the peers")
    t.add_argument(
        "--tls-cert", default=d.tls_cert, metavar="PEM", help="this agent's certificate (agent/ID)"
    )
    t.add_argument("--tls-key", default=d.tls_key, metavar="PEM", help="this agent's key")
    t.add_argument(
        "--tls-server-name",
        default=d.tls_server_name,
        metavar="NAME",
        help="name to verify in the controller's certificate (default: its host)",
    )
    t.add_argument(
        "--plaintext",
        action="store_true",
        default=d.plaintext,
        help="no TLS to the controller: unauthenticated, loopback or unix:// only",
    )
    serve_mode = t.add_mutually_exclusive_group()
    serve_mode.add_argument(
        "--serve-plaintext",
        action="store_true",
        help="serve Predict without TLS: callers unauthenticated, loopback --serve only",
    )
    serve_mode.add_argument(
        "--serve-no-client-auth",
        action="store_true",
        help="serve Predict over TLS without client certificates: callers unauthenticated",
    )
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
        "--metrics-tls",
        action="store_true",
        help="metrics over TLS with the agent's certificate (needed off loopback)",
    )
    a.add_argument(
        "--privacy",
        default=d.privacy,
        metavar="SPEC",
        help="local DP noise on what is sent, per whole input: gaussian:EPS[:DELTA]"
        "[,clip=C][,centre=V][,logits=raw|label|noised:EPS] or laplace:EPS[,...]; the"
        " controller's detectors must be trained with the same --privacy (default: off)",
    )
    a.add_argument(
        "--activations",
        default="",
        metavar="LAYERS",
        help="layer names (features.2,features.5) whose activations this agent can send"
        " with each inspected item, when the controller asks for them (feature-map"
        " detectors; torch, TorchScript or ONNX: module paths or tensor names)",
    )
    a.add_argument(
        "--activations-dtype", choices=("float16", "float32"), default=d.activations_dtype
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
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        plaintext=args.plaintext,
        tls_server_name=args.tls_server_name,
        input_shape=args.input_shape,
        class_names=args.classes,
        input_range=args.input_range,
        budget_us=args.budget_us,
        fail_mode=args.fail_mode,
        privacy=args.privacy,
        activations=args.activations,
        activations_dtype=args.activations_dtype,
        batch_window_us=args.batch_window_us,
        max_batch_items=args.max_batch_items,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        metrics_tls=args.metrics_tls,
        # 0 (the old way to say it) = do not wait
        connect_timeout_s=args.connect_timeout or None,
    )


def serve_tls(args: argparse.Namespace, config: AgentConfig) -> TlsFiles | None:
    """The model APIs' TLS files: the agent's own (None with --serve-plaintext, which
    must then be on loopback, for --serve-http too)."""
    if args.serve_plaintext:
        check_plaintext(parse_address(args.serve, "serve"), "serve")
        if args.serve_http:
            check_plaintext(parse_address(args.serve_http, "serve_http"), "serve_http")
        return None
    return TlsFiles.from_settings(config.tls_ca, config.tls_cert, config.tls_key)


async def _serve(args: argparse.Namespace, config: AgentConfig) -> int:
    from agents.guard import attach
    from agents.server import start_http_server, start_server

    if args.model_threads < 1:
        raise ConfigError(f"model_threads: must be > 0, got {args.model_threads}")
    tls = serve_tls(args, config)  # before anything starts
    executor = ThreadPoolExecutor(args.model_threads, thread_name_prefix="model")
    try:
        guard = attach(args.model, config, model_executor=executor)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    http = server = None
    try:
        client_auth = not args.serve_no_client_auth
        server, port = await start_server(guard, args.serve, tls=tls, client_auth=client_auth)
        host = args.serve.rsplit(":", 1)[0]
        derived = "" if args.model_id else " (from the file name: --model-id sets it)"
        where = f"{host}:{port}"
        if args.serve_http:
            http, http_port = await start_http_server(
                guard, args.serve_http, tls=tls, client_auth=client_auth
            )
            where += f", REST on {args.serve_http.rsplit(':', 1)[0]}:{http_port}"
        print(
            f"openexample-agent: serving model id {guard.model_id!r}{derived} on {where}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if http is not None:
            await http.cleanup()
        if server is not None:
            await server.stop(grace=2.0)
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
