"""openexample/metrics_http.py: the three paths, 404 elsewhere, readiness, mTLS."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from openexample import metrics_http
from openexample.pki import DevPki
from openexample.tls import client_context


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_paths_and_readiness() -> None:
    reg = CollectorRegistry()
    Counter("probe_things", "doc", registry=reg).inc(3)
    ready = [False]
    httpd, thread = metrics_http.serve(0, "127.0.0.1", reg, ready=lambda: ready[0])
    base = f"http://127.0.0.1:{httpd.server_port}"
    try:
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "probe_things_total 3.0" in body
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz") == (503, "not ready\n")
        ready[0] = True
        assert _get(f"{base}/readyz") == (200, "ready\n")
        for path in ("/", "/metric", "/metrics/x", "/healthz/"):
            status, body = _get(base + path)
            assert status == 404 and "/metrics, /healthz, /readyz" in body, path
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_a_port_in_use_raises_oserror() -> None:
    reg = CollectorRegistry()
    httpd, thread = metrics_http.serve(0, "127.0.0.1", reg, ready=lambda: True)
    try:
        with pytest.raises(OSError):
            metrics_http.serve(httpd.server_port, "127.0.0.1", reg, ready=lambda: True)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_with_tls_a_client_certificate_is_required(tmp_path) -> None:
    pki = DevPki(tmp_path / "pki").ensure(["controller/c1", "reader/grafana"], hosts=["localhost"])
    server, reader = pki.files("controller/c1"), pki.files("reader/grafana")
    reg = CollectorRegistry()
    httpd, thread = metrics_http.serve(0, "127.0.0.1", reg, ready=lambda: True, tls=server)
    url = f"https://localhost:{httpd.server_port}/readyz"
    try:
        assert _get(url, client_context(reader)) == (200, "ready\n")
        anonymous = ssl.create_default_context(cafile=str(server.ca))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _get(url, anonymous)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_the_daemon_and_an_agent_answer_readyz(controller, example_model) -> None:
    from agents import attach
    from tests.conftest import MODEL_ID

    proc = controller()
    base = f"http://127.0.0.1:{proc.metrics_port}"
    assert _get(f"{base}/readyz") == (200, "ready\n")
    assert _get(f"{base}/healthz") == (200, "ok\n")
    assert _get(f"{base}/")[0] == 404
    assert "openexample_controller_budget_seconds" in _get(f"{base}/metrics")[1]
    g = attach(
        str(example_model),
        controller=proc.address,
        model_id=MODEL_ID,
        input_shape=(1, 28, 28),
        metrics_port=0,
        connect_timeout_s=30,
        **proc.agent_tls("ready-probe"),
    )
    try:
        assert g.connected
        agent = f"http://127.0.0.1:{g.metrics_port}"
        assert _get(f"{agent}/readyz") == (200, "ready\n")
        assert _get(f"{agent}/nope")[0] == 404
        proc.stop()  # the session goes down: not ready
        assert _wait_not_ready(f"{agent}/readyz")
    finally:
        g.close()


def _wait_not_ready(url: str, timeout_s: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _get(url)[0] == 503:
            return True
        time.sleep(0.1)
    return False
