"""The end-user side of ``openexample-agent attach``: the guarded model's APIs.

Two APIs on one gRPC server, plus an optional HTTP/REST listener:

- **Predict** (``openexample.v1.Predictor``): one input or a batch through
  ``guard.abatch`` (the vigilance loop between the user and the model), one
  PredictResult per input, withheld ones included (kept: it is the only API that
  answers each input of a batch on its own, with the verdict as typed fields).
- **The Open Inference Protocol** (KServe v2, ``inference.GRPCInferenceService`` here
  and ``/v2/...`` over HTTP with :func:`start_http_server`), so Triton and KServe
  clients call the guarded model unchanged (:mod:`agents.oip`).

Health checking and reflection are on, as for every gRPC server of the project.

**TLS and who the source is.** The APIs are served over TLS with the agent's own
certificate (``tls=files``), and by default every caller must present a certificate
from the same CA (mTLS). The source id that reaches the vigilance loop, and so the
controller's rules, source tracing and blocks, is then taken from the certificate,
never from the request (:mod:`agents.callers`): a ``caller/<name>`` certificate is the
source ``<name>``, a claimed source id that differs is refused with
PERMISSION_DENIED, and so is a certificate of another kind. Unauthenticated callers
(``tls=None``, plain text, loopback only; or ``client_auth=False``) get the source
``unauth:<peer host>/<source_id>``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agents import oip, oip_grpc
from agents.callers import UNAUTH, BadSource, CallerRefused
from agents.guard import Guard
from agents.results import Result
from openexample import tensor
from openexample.addresses import GRPC, parse_address
from openexample.errors import ConfigError, ProtocolError
from openexample.grpc_tls import grpc_server_credentials
from openexample.tls import TlsFiles, check_plaintext
from openexample.v1 import openexample_pb2 as pb
from openexample.v1 import predict_pb2, predict_pb2_grpc

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

_VERDICTS = {
    "benign": pb.VERDICT_BENIGN,
    "adversarial": pb.VERDICT_ADVERSARIAL,
    "unknown": pb.VERDICT_UNKNOWN,
}
_DECIDED_BY = {
    "rule": predict_pb2.DECIDED_BY_RULE,
    "rt": predict_pb2.DECIDED_BY_RT,
    "controller": predict_pb2.DECIDED_BY_CONTROLLER,
    "timeout": predict_pb2.DECIDED_BY_TIMEOUT,
    "disconnected": predict_pb2.DECIDED_BY_DISCONNECTED,
}


def result_to_pb(res: Result) -> predict_pb2.PredictResult:
    out = predict_pb2.PredictResult(
        released=res.released,
        label=res.label,
        verdict=_VERDICTS[res.verdict],
        decided_by=_DECIDED_BY[res.decided_by],
        added_latency_us=res.latency_s * 1e6,
    )
    if res.output is not None:
        tensor.encode(res.output, out.output)
    return out


def model_view(guard: Guard) -> oip.ModelView:
    """What the Open Inference Protocol says about the guarded model."""
    if guard.core is None or guard.model_id is None:
        raise ConfigError("serve: the model's input shape is not known (--input-shape)")
    info = guard.core.models[guard.model_id]
    limits = guard.config.limits
    return oip.ModelView(
        name=guard.model_id,
        input_shape=tuple(info.input_shape),
        input_dtype=np.dtype(info.input_dtype),
        n_classes=len(info.class_names),
        framework=info.framework,
        max_batch=limits.max_batch_items,
        max_elements=limits.max_tensor_elements,
    )


class PredictorService(predict_pb2_grpc.PredictorServicer):
    def __init__(
        self, guard: Guard, max_batch: int | None = None, *, authenticated: bool = True
    ) -> None:
        self.guard = guard
        # True: every caller has a verified certificate (mTLS); the source comes from it.
        self.authenticated = authenticated
        # default: the most items one PKG_IN batch may carry under the agent's limits
        self.max_batch = max_batch or guard.config.limits.max_batch_items

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        source = await self._source(request.source_id, context)  # who asks, before all else
        guard = self.guard
        if request.model_id and request.model_id != guard.model_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_id!r}")
        try:
            arr = tensor.decode(request.input)
        except ProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        shape = guard.input_shape
        if arr.shape == shape:
            arr = arr[None]
        elif arr.shape[1:] != shape:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"input shape {arr.shape}, model takes {shape}"
            )
        if not 0 < len(arr) <= self.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"batch of {len(arr)} (1..{self.max_batch})"
            )
        results = await guard.abatch(arr, source_id=source)
        return predict_pb2.PredictResponse(results=[result_to_pb(r) for r in results])

    async def _source(self, claimed: str, context: grpc.aio.ServicerContext) -> str:
        """The source id of this call (:func:`agents.oip_grpc.grpc_source`)."""
        try:
            return oip_grpc.grpc_source(claimed, context, self.authenticated)
        except CallerRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except BadSource as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _listener_security(what: str, address: str, tls: TlsFiles | None, client_auth: bool) -> None:
    """Plain text only on loopback; unauthenticated callers said out loud."""
    if tls is None:
        check_plaintext(parse_address(address, what), what)
        log.warning(
            "%s on %s: plain text, callers unauthenticated (sources are %s<host>/...)",
            what,
            address,
            UNAUTH,
        )
    elif not client_auth:
        log.warning(
            "%s on %s: TLS without client certificates, callers unauthenticated"
            " (sources are %s<host>/...)",
            what,
            address,
            UNAUTH,
        )


async def start_server(
    guard: Guard, address: str, *, tls: TlsFiles | None, client_auth: bool = True
) -> tuple[grpc.aio.Server, int]:
    """Start serving Predict and the Open Inference Protocol (gRPC) on ``address``
    (``host:port``, port 0 = any); returns the server and the bound port.

    ``tls``: the agent's own CA, certificate and key (its certificate must name the
    host callers dial; :mod:`openexample.pki` agent certificates carry localhost,
    127.0.0.1 and ::1). With ``client_auth`` (the default) every caller must present a
    certificate from that CA, and its ``caller/<name>`` identity is the source id;
    without, callers are unauthenticated (``unauth:<host>/...``). ``tls=None`` serves
    plain text, unauthenticated, and only on a loopback address (logged as a WARNING).
    A malformed or refused address is a ConfigError naming ``serve``.
    """
    where = parse_address(address, "serve")
    if where.scheme != GRPC:
        raise ConfigError(f"serve: HOST:PORT (the model APIs are gRPC), got {address!r}")
    _listener_security("serve", address, tls, client_auth)
    view = model_view(guard)
    credentials = None
    if tls is not None:
        credentials = grpc_server_credentials(tls, require_client_cert=client_auth)
    authenticated = tls is not None and client_auth
    server = grpc.aio.server(options=guard.config.limits.grpc_options())
    predict_pb2_grpc.add_PredictorServicer_to_server(
        PredictorService(guard, authenticated=authenticated), server
    )
    inference = oip_grpc.InferenceService(guard, view, authenticated=authenticated)
    server.add_generic_rpc_handlers((oip_grpc.handler(inference),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        predict_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # The inference service is not listed: its messages are openexample.oip's, under
    # another service name (proto/openexample/v1/oip.proto), which reflection cannot tell.
    reflection.enable_server_reflection(names, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(where.host_port)
        else:
            port = server.add_secure_port(where.host_port, credentials)
    except RuntimeError as exc:  # grpc raises this for a port it cannot bind
        raise OSError(f"serve: cannot listen on {address} ({exc})") from None
    if port == 0:
        raise OSError(f"serve: cannot listen on {address}")
    await server.start()
    for name in ("", names[0], oip_grpc.SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def start_http_server(
    guard: Guard, address: str, *, tls: TlsFiles | None, client_auth: bool = True
) -> tuple[web.AppRunner, int]:
    """Start the Open Inference Protocol's HTTP/REST API on ``address`` (``host:port``);
    returns the aiohttp runner (``await runner.cleanup()`` stops it) and the bound
    port. TLS, client certificates and plain text as for :func:`start_server`."""
    from agents.oip_http import start_http  # aiohttp only for agents that serve REST

    where = parse_address(address, "serve_http")
    if where.scheme != GRPC:  # a bare HOST:PORT
        raise ConfigError(f"serve_http: HOST:PORT, got {address!r}")
    _listener_security("serve_http", address, tls, client_auth)
    view = model_view(guard)
    return await start_http(guard, view, where.host, where.port, tls=tls, client_auth=client_auth)
