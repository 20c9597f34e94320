"""The HTTP endpoint of both planes: ``/metrics``, ``/healthz``, ``/readyz``; 404 elsewhere.

A shell shared by the controller and the agents (like ``grpc_tls.py``): it listens. Why not
prometheus-client's ``start_http_server``: it answers every path with the metrics, so a
probe of ``/healthz`` learns nothing, and a typo in a scrape path goes unnoticed.

- ``/metrics``: prometheus-client's WSGI app (text format, gzip when asked);
- ``/healthz``: 200 while the process serves HTTP at all (liveness);
- ``/readyz``: 200 when ``ready()`` says so, else 503 (readiness: the controller once it
  listens with its detectors loaded, an agent once its session with the controller is up);
- anything else: 404 naming the three paths.

With TLS files the endpoint requires a client certificate from the same CA (mTLS), as
every other listener.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from openexample.tls import TlsFiles, server_context

PATHS = ("/metrics", "/healthz", "/readyz")


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the logs


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _text(start_response: Callable, status: str, body: str) -> Iterable[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def make_app(registry: CollectorRegistry, ready: Callable[[], bool]) -> Callable:
    """The WSGI app: the three paths, 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            if ready():
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", "not ready\n")
        return _text(start_response, "404 Not Found", f"not found; try {', '.join(PATHS)}\n")

    return app


def serve(
    port: int,
    addr: str,
    registry: CollectorRegistry,
    *,
    ready: Callable[[], bool],
    tls: TlsFiles | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Listen on ``addr:port`` (0: a free port: ``server.server_port``) in a daemon thread.
    Raises OSError when the address cannot be bound."""

    class Server(_Server):
        address_family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    httpd = make_server(addr, port, make_app(registry, ready), Server, handler_class=_Quiet)
    if tls is not None:
        httpd.socket = server_context(tls).wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread
