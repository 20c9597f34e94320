"""The Open Inference Protocol over HTTP/REST (KServe v2 ``/v2/...``), with aiohttp.

A thin shell over :mod:`agents.oip`: the same model view, the same caller rule as the
gRPC side (mTLS ``caller/NAME`` certificates by default; :mod:`agents.callers`), and
Triton's binary tensor extension (``Inference-Header-Content-Length``), which
tritonclient uses by default. Errors are ``{"error": "..."}`` with the status of
:data:`agents.oip.STATUS`; a withheld answer (403) carries the guard's decision in
``parameters`` as well. Readiness follows the KServe spec: 200 when the session with
the controller is up, 400 otherwise.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

from aiohttp import web

from agents import oip
from agents.callers import BadSource, CallerRefused, caller_source
from agents.guard import Guard
from agents.oip_grpc import EXTENSIONS, SERVER_NAME
from openexample import __version__
from openexample.tls import TlsFiles, server_context, ssl_peer_identity

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"


def _error(exc: oip.OipError) -> web.Response:
    status, _ = oip.STATUS[exc.kind]
    body: dict[str, Any] = {"error": exc.message}
    if exc.parameters:
        body["parameters"] = exc.parameters
    return web.json_response(body, status=status)


def _bad(message: str) -> oip.OipError:
    return oip.OipError("invalid", message)


class InferenceApp:
    """The routes of one guarded model."""

    def __init__(self, guard: Guard, view: oip.ModelView, *, authenticated: bool) -> None:
        self.guard = guard
        self.view = view
        self.authenticated = authenticated

    def routes(self) -> list[web.RouteDef]:
        m = "/v2/models/{name}"
        v = "/v2/models/{name}/versions/{version}"
        return [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get(m, self.model_metadata),
            web.get(v, self.model_metadata),
            web.get(m + "/ready", self.model_ready),
            web.get(v + "/ready", self.model_ready),
            web.post(m + "/infer", self.infer),
            web.post(v + "/infer", self.infer),
        ]

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.guard.connected
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
        except oip.OipError as exc:
            return _error(exc)
        return web.json_response(self.view.metadata())

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
        except oip.OipError as exc:
            return _error(exc)
        ready = self.guard.connected
        return web.json_response({"ready": ready}, status=200 if ready else 400)

    async def infer(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
            header, binary = _split(body, request.headers.get(HEADER_LENGTH))
            source = self._source(request, header)  # who asks, before all else
            self._check(request)
            x = _input(self.view, header, binary)
            outputs, binary_out = _outputs(self.view, header)
            results = await self.guard.abatch(x, source_id=source)
            params, tensors = oip.answer(results, outputs)
        except oip.OipError as exc:
            return _error(exc)
        except RuntimeError as exc:  # the guard is closing
            return _error(oip.OipError("unavailable", str(exc)))
        reply: dict[str, Any] = {
            "model_name": self.view.name,
            "model_version": oip.VERSION,
            "parameters": params,
            "outputs": [],
        }
        if isinstance(header.get("id"), str):
            reply["id"] = header["id"]
        blobs = []
        for t in tensors:
            out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            if t.name in binary_out:
                blob = t.array.tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = t.array.reshape(-1).tolist()
            reply["outputs"].append(out)
        text = json.dumps(reply).encode()
        if not blobs:
            return web.Response(body=text, content_type="application/json")
        return web.Response(
            body=b"".join([text, *blobs]),
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(text))},
        )

    def _check(self, request: web.Request) -> None:
        info = request.match_info
        self.view.check_model(info["name"], info.get("version", ""))

    def _source(self, request: web.Request, header: dict) -> str:
        params = header.get("parameters") or {}
        claimed = params.get(oip.SOURCE_PARAMETER, "") if isinstance(params, dict) else ""
        if not isinstance(claimed, str):
            raise _bad(f"parameter {oip.SOURCE_PARAMETER}: a string")
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        try:
            return caller_source(
                claimed,
                authenticated=self.authenticated,
                identity=ssl_peer_identity(ssl_object) if self.authenticated else None,
                peer_host=request.remote or "?",
            )
        except CallerRefused as exc:
            raise oip.OipError("refused", str(exc)) from None
        except BadSource as exc:
            raise _bad(str(exc)) from None


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary data that follows it (binary tensor extension)."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH}: {header_length!r} is not a number") from None
        if not 0 <= n <= len(body):
            raise _bad(f"{HEADER_LENGTH}: {n} for a body of {len(body)} bytes")
    try:
        header = json.loads(body[:n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"request body: not JSON ({exc})") from None
    except RecursionError:  # "[[[[..." deeper than the parser's stack
        raise _bad("request body: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise _bad("request body: a JSON object with 'inputs'")
    return header, body[n:]


def _input(view: oip.ModelView, header: dict, binary: bytes) -> Any:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        n = len(inputs) if isinstance(inputs, list) else 0
        raise _bad(f"{n} inputs (the model takes 1: {oip.INPUT})")
    (t,) = inputs
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise _bad("input: 'name' and 'datatype' are strings")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise _bad(f"input {name}: 'shape' is a list of integers")
    params = t.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise _bad(
                f"input {name}: binary_data_size {size!r}, {len(binary)} bytes after the header"
            )
        data: Any = binary
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes after the JSON header that no input claims")
        if "data" not in t:
            raise _bad(f"input {name}: no 'data' and no binary_data_size")
        data = t["data"]
    return view.decode_input(name, datatype, shape, data)


def _outputs(view: oip.ModelView, header: dict) -> tuple[tuple[str, ...], set[str]]:
    """The outputs asked for, and those to send as binary data."""
    params = header.get("parameters") or {}
    all_binary = isinstance(params, dict) and params.get("binary_data_output") is True
    asked = header.get("outputs") or []
    if not isinstance(asked, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked
    ):
        raise _bad("outputs: a list of {'name': ...}")
    names = view.requested(o["name"] for o in asked)
    binary = {
        o["name"]
        for o in asked
        if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True
    }
    return names, set(names) if all_binary else binary


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as KServe's ``{"error": ...}`` (aiohttp answers HTML otherwise)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text if exc.text and not exc.text.startswith("<") else exc.reason
        return web.json_response({"error": f"{exc.status}: {text}"}, status=exc.status)


async def start_http(
    guard: Guard,
    view: oip.ModelView,
    host: str,
    port: int,
    *,
    tls: TlsFiles | None,
    client_auth: bool,
) -> tuple[web.AppRunner, int]:
    """Serve the REST API on ``host:port`` (0 = any); returns the runner and the port.
    The caller has checked that plain text is on loopback (``tls=None``)."""
    context: ssl.SSLContext | None = None
    if tls is not None:
        context = server_context(tls)
        if not client_auth:
            context.verify_mode = ssl.CERT_NONE
    app = web.Application(
        client_max_size=guard.config.limits.max_message_bytes, middlewares=[_json_errors]
    )
    app.add_routes(
        InferenceApp(guard, view, authenticated=tls is not None and client_auth).routes()
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"serve_http: cannot listen on {host}:{port} ({exc.strerror})") from None
    return runner, runner.addresses[0][1]
