"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

A thin shell over :mod:`agents.oip`, served on the same gRPC server (and the same
TLS, the same caller identities) as Predict. The methods are registered under their
standard service name with a generic handler; the messages are openexample.oip's
(see proto/openexample/v1/oip.proto for why).

A withheld answer is PERMISSION_DENIED whose message names each withheld input's
verdict, decider and reason; the decision also travels as trailing metadata
(``openexample-verdict``, ``openexample-decided-by``, ``openexample-reason``).
"""

from __future__ import annotations

from typing import Any

import grpc

from agents import oip
from agents.callers import BadSource, CallerRefused, caller_source, grpc_peer_host
from agents.guard import Guard
from openexample import __version__
from openexample.tls import grpc_peer_identity
from openexample.v1 import oip_pb2 as op

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "openexample-agent"
EXTENSIONS = ("binary_tensor_data",)  # the REST binary extension (raw contents on gRPC)

_CONTENTS = {  # datatype -> the InferTensorContents field that carries it
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def to_parameter(value: Any, out: op.InferParameter) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        out.bool_param = value
    elif isinstance(value, int):
        out.int64_param = value
    elif isinstance(value, float):
        out.double_param = value
    else:
        out.string_param = str(value)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode()


class InferenceService:
    """The six methods Triton and KServe clients use to find and call a model."""

    def __init__(self, guard: Guard, view: oip.ModelView, *, authenticated: bool) -> None:
        self.guard = guard
        self.view = view
        self.authenticated = authenticated

    async def ServerLive(self, request: op.ServerLiveRequest, context: Any) -> Any:
        return op.ServerLiveResponse(live=True)

    async def ServerReady(self, request: op.ServerReadyRequest, context: Any) -> Any:
        return op.ServerReadyResponse(ready=self.guard.connected)

    async def ModelReady(self, request: op.ModelReadyRequest, context: Any) -> Any:
        try:
            self.view.check_model(request.name, request.version)
        except oip.OipError as exc:
            await _abort(context, exc)
        return op.ModelReadyResponse(ready=self.guard.connected)

    async def ServerMetadata(self, request: op.ServerMetadataRequest, context: Any) -> Any:
        return op.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(self, request: op.ModelMetadataRequest, context: Any) -> Any:
        try:
            self.view.check_model(request.name, request.version)
        except oip.OipError as exc:
            await _abort(context, exc)
        meta = self.view.metadata()
        out = op.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for key in ("inputs", "outputs"):
            for t in meta[key]:
                getattr(out, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return out

    async def ModelInfer(self, request: op.ModelInferRequest, context: Any) -> Any:
        try:
            source = self._source(request, context)  # who asks, before all else
            view = self.view
            view.check_model(request.model_name, request.model_version)
            x = _input(view, request)
            outputs = view.requested(o.name for o in request.outputs)
            results = await self.guard.abatch(x, source_id=source)
            params, tensors = oip.answer(results, outputs)
        except oip.OipError as exc:
            await _abort(context, exc)
        except RuntimeError as exc:  # the guard is closing
            await _abort(context, oip.OipError("unavailable", str(exc)))
        out = op.ModelInferResponse(model_name=view.name, model_version=oip.VERSION, id=request.id)
        for key, value in params.items():
            to_parameter(value, out.parameters[key])
        for t in tensors:
            out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            out.raw_output_contents.append(t.array.tobytes())
        return out

    def _source(self, request: op.ModelInferRequest, context: Any) -> str:
        params = request.parameters
        claimed = (
            params[oip.SOURCE_PARAMETER].string_param if oip.SOURCE_PARAMETER in params else ""
        )
        try:
            return grpc_source(claimed, context, self.authenticated)
        except CallerRefused as exc:
            raise oip.OipError("refused", str(exc)) from None
        except BadSource as exc:
            raise oip.OipError("invalid", str(exc)) from None


def grpc_source(claimed: str, context: Any, authenticated: bool) -> str:
    """:func:`agents.callers.caller_source` for a gRPC call (Predict and ModelInfer)."""
    return caller_source(
        claimed,
        authenticated=authenticated,
        identity=grpc_peer_identity(context) if authenticated else None,
        peer_host=grpc_peer_host(context.peer()),
    )


def _input(view: oip.ModelView, request: op.ModelInferRequest) -> Any:
    if len(request.inputs) != 1:
        raise oip.OipError("invalid", f"{len(request.inputs)} inputs (the model takes 1: input)")
    (t,) = request.inputs
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise oip.OipError("invalid", "raw_input_contents: one entry per input")
        data: Any = request.raw_input_contents[0]
    else:
        field = _CONTENTS.get(t.datatype)
        if field is None:  # FP16 and friends have no contents field: raw only
            raise oip.OipError(
                "invalid", f"input {t.name}: {t.datatype} travels in raw_input_contents only"
            )
        data = getattr(t.contents, field)
    return view.decode_input(t.name, t.datatype, list(t.shape), data)


async def _abort(context: Any, exc: oip.OipError) -> None:
    _, code = oip.STATUS[exc.kind]
    trailers = tuple(
        (key.replace(".", "-").replace("_", "-"), _ascii(str(value)))
        for key, value in exc.parameters.items()
    )
    await context.abort(getattr(grpc.StatusCode, code), exc.message, trailing_metadata=trailers)


def handler(service: InferenceService) -> grpc.GenericRpcHandler:
    """The generic handler that serves ``service`` as ``inference.GRPCInferenceService``."""
    methods = {}
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata"):
        req = getattr(op, f"{name}Request")
        resp = getattr(op, f"{name}Response")
        methods[name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
    methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        service.ModelInfer,
        request_deserializer=op.ModelInferRequest.FromString,
        response_serializer=op.ModelInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, methods)
