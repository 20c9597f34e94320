"""The end-user side of ``openexample-agent attach``: the Predictor gRPC service.

Each Predict runs one input or a batch through ``guard.abatch`` (the vigilance loop
between the user and the model) and answers one PredictResult per input. Health
checking and reflection are on, as for every gRPC server of the project.

**TLS and who the source is.** The API is served over TLS with the agent's own
certificate (``start_server(..., tls=files)``), and by default every caller must
present a certificate from the same CA (mTLS). The source id that reaches the vigilance
loop, and so the controller's rules, source tracing and blocks, is then taken from
the certificate, never from the request:

- a ``caller/<name>`` certificate: the source is ``<name>``. A request whose
  ``source_id`` is set to anything else is refused with PERMISSION_DENIED
  (``source_id X: your certificate says caller/Y``);
- a certificate of any other kind (agent, operator, ...), or one with no identity:
  PERMISSION_DENIED.

Unauthenticated callers (``tls=None``, plain text, allowed on loopback only; or
``client_auth=False``, TLS without client certificates) get the source
``unauth:<peer host>/<source_id>``, or ``unauth:<peer host>`` when they claim none.
Certificate names cannot contain ``:``, so an unauthenticated caller can never pass
for an authenticated source (nor for another host), whatever it claims.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agents.guard import Guard
from agents.results import Result
from openexample import tensor
from openexample.addresses import GRPC, parse_address
from openexample.errors import ConfigError, ProtocolError
from openexample.grpc_tls import grpc_server_credentials
from openexample.identity import Kind
from openexample.limits import MAX_ID_BYTES
from openexample.tls import TlsFiles, check_plaintext, grpc_peer_identity
from openexample.v1 import openexample_pb2 as pb
from openexample.v1 import predict_pb2, predict_pb2_grpc

log = logging.getLogger(__name__)
UNAUTH = "unauth:"  # the prefix of every unauthenticated caller's source id

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


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4`` (who an unauthenticated caller is)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


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
        """The source id of this call (see the module docstring)."""
        if self.authenticated:
            peer = grpc_peer_identity(context)
            if peer is None or peer.kind is not Kind.CALLER:
                what = f"identity {peer}" if peer is not None else "no openexample identity"
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"your certificate carries {what}; Predict takes caller/NAME certificates",
                )
            if claimed and claimed != peer.name:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"source_id {claimed}: your certificate says {peer}",
                )
            return peer.name
        host = _peer_host(context.peer())
        source = f"{UNAUTH}{host}/{claimed}" if claimed else f"{UNAUTH}{host}"
        if len(source.encode()) > MAX_ID_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"source_id: too long (as {UNAUTH}{host}/..., at most {MAX_ID_BYTES} bytes)",
            )
        return source


async def start_server(
    guard: Guard, address: str, *, tls: TlsFiles | None, client_auth: bool = True
) -> tuple[grpc.aio.Server, int]:
    """Start serving Predict on ``address`` (``host:port``, port 0 = any); returns the
    server and the bound port.

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
        raise ConfigError(f"serve: HOST:PORT (the Predict API is gRPC), got {address!r}")
    if tls is None:
        check_plaintext(where, "serve")
        log.warning(
            "Predict on %s: plain text, callers unauthenticated (sources are %s<host>/...)",
            address,
            UNAUTH,
        )
        credentials = None
    else:
        credentials = grpc_server_credentials(tls, require_client_cert=client_auth)
        if not client_auth:
            log.warning(
                "Predict on %s: TLS without client certificates, callers unauthenticated"
                " (sources are %s<host>/...)",
                address,
                UNAUTH,
            )
    authenticated = tls is not None and client_auth
    server = grpc.aio.server(options=guard.config.limits.grpc_options())
    predict_pb2_grpc.add_PredictorServicer_to_server(
        PredictorService(guard, authenticated=authenticated), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        predict_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
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
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    return server, port
