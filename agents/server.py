"""The end-user side of ``openexample-agent attach``: the Predictor gRPC service.

Each Predict runs one input or a batch through ``guard.abatch`` (the vigilance loop
between the user and the model) and answers one PredictResult per input. Health
checking and reflection are on, as for every gRPC server of the project.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from agents.guard import Guard
from agents.results import Result
from openexample import tensor
from openexample.addresses import GRPC, parse_address
from openexample.errors import ConfigError, ProtocolError
from openexample.v1 import openexample_pb2 as pb
from openexample.v1 import predict_pb2, predict_pb2_grpc

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
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4`` (the source id of a user who gave none)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class PredictorService(predict_pb2_grpc.PredictorServicer):
    def __init__(self, guard: Guard, max_batch: int | None = None) -> None:
        self.guard = guard
        # default: the most items one PKG_IN batch may carry under the agent's limits
        self.max_batch = max_batch or guard.config.limits.max_batch_items

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
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
        source = request.source_id or _peer_host(context.peer())
        results = await guard.abatch(arr, source_id=source)
        return predict_pb2.PredictResponse(results=[result_to_pb(r) for r in results])


async def start_server(guard: Guard, address: str) -> tuple[grpc.aio.Server, int]:
    """Start serving Predict on ``address`` (``host:port``, port 0 = any); returns the
    server and the bound port. A malformed address is a ConfigError naming ``serve``."""
    where = parse_address(address, "serve")
    if where.scheme != GRPC:
        raise ConfigError(f"serve: HOST:PORT (the Predict API is gRPC), got {address!r}")
    server = grpc.aio.server(options=guard.config.limits.grpc_options())
    predict_pb2_grpc.add_PredictorServicer_to_server(PredictorService(guard), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        predict_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(where.host_port)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    return server, port
