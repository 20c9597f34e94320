"""The operator's API (``openexample.v1.ControllerAdmin``) on the daemon's gRPC server:
rules add/modify/del/list, the agents list and unblocking a source, each call authorized
by the caller's client certificate and every change journaled with who made it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict

from controller.core import Step
from controller.desired import TEMPLATE
from openexample import tls
from openexample.errors import ProtocolError
from openexample.identity import Kind
from openexample.v1 import admin_pb2, admin_pb2_grpc
from openexample.v1 import openexample_pb2 as pb

if TYPE_CHECKING:
    from controller.server import ControllerServer

log = logging.getLogger("openexample.controller")
REPLY_TIMEOUT_S = 2.0

_READERS = (Kind.OPERATOR, Kind.READER)
_WRITERS = (Kind.OPERATOR,)


class AdminService(admin_pb2_grpc.ControllerAdminServicer):
    """Operator API: rules add/list/del and the agents list.

    Who may call what comes from the caller's client certificate: ``operator``
    identities read and change, ``reader`` identities read; anyone else (agents
    included) gets PERMISSION_DENIED. Every change, and every refused attempt, goes to
    the journal with who made it.
    """

    def __init__(self, srv: ControllerServer) -> None:
        self.srv = srv

    async def _caller(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        allowed: tuple[Kind, ...],
        request: object = None,
    ) -> str:
        """Who calls (for the journal); aborts with PERMISSION_DENIED if not allowed."""
        srv = self.srv
        if srv.tls is None:
            return "plaintext"
        ident = tls.grpc_peer_identity(context)
        if ident is not None and ident.kind in allowed:
            return str(ident)
        who = str(ident) if ident is not None else "a certificate with no identity"
        need = " or ".join(k.value for k in allowed)
        srv.metrics.errors.labels("ADMIN_DENIED").inc()
        log.warning("admin %s denied to %s (needs %s)", method, who, need)
        if request is not None:
            await self._journal(who, method, request, f"denied: needs {need}")
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{method}: {who} may not (needs {need})"
        )
        raise AssertionError("unreachable")  # abort raises

    async def _journal(self, who: str, method: str, request: object, outcome: str) -> None:
        text = json.dumps(MessageToDict(request, preserving_proto_field_name=True))
        await asyncio.to_thread(
            self.srv.journal.record_admin, time.time(), who, method, text, outcome
        )

    async def ModRules(
        self, request: admin_pb2.ModRulesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModRulesResponse:
        who = await self._caller(context, "ModRules", _WRITERS, request)
        roles = self.srv.roles
        refusal = roles.refusal() if roles is not None else ""
        if refusal:  # several controllers: the agent group's master takes rule changes
            await self._journal(who, "ModRules", request, f"refused: {refusal}")
            log.warning("admin ModRules by %s refused: %s", who, refusal)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"ModRules: {refusal}")
        response = await self._mod_rules(request, context, who)
        refused = [f"{r.agent_id}: {r.error.text}" for r in response.results if r.HasField("error")]
        outcome = "ok" if not refused else "refused by " + "; ".join(refused)
        await self._journal(who, "ModRules", request, outcome)
        log.info("admin ModRules by %s: %s", who, outcome)
        return response

    async def _mod_rules(
        self, request: admin_pb2.ModRulesRequest, context: grpc.aio.ServicerContext, who: str
    ) -> admin_pb2.ModRulesResponse:
        core = self.srv.core
        try:
            step, waits = core.mod_rules(
                request.mod,
                time.monotonic(),
                agent_id=request.agent_id,
                model_id=request.model_id,
            )
        except ProtocolError as err:
            await self._journal(who, "ModRules", request, f"invalid: {err}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        futures = []
        for sid, mod_xid, barrier_xid, agent_id in waits:
            futures.append(
                (
                    agent_id,
                    self.srv.expect_reply(sid, mod_xid),
                    self.srv.expect_reply(sid, barrier_xid),
                )
            )
        self.srv.dispatch(step)  # stored before the agents get it
        results = []
        for agent_id, mod_fut, barrier_fut in futures:
            res = admin_pb2.AgentResult(agent_id=agent_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(barrier_fut), REPLY_TIMEOUT_S)
            if mod_fut.done() and mod_fut.result().HasField("error"):
                res.error.CopyFrom(mod_fut.result().error)
            elif not barrier_fut.done():
                res.error.CopyFrom(pb.Error(text="no BARRIER_REPLY in time"))
            mod_fut.cancel()
            barrier_fut.cancel()
            results.append(res)
        return admin_pb2.ModRulesResponse(results=results)

    async def ListRules(
        self, request: admin_pb2.ListRulesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRulesResponse:
        """Connected agents answer with their live tables (STATS RULES); known agents
        that are not connected, and the template when no agent is, are answered from
        the controller's desired rules (marked ``desired``). With ``request.desired``,
        desired rules only, for every known agent and the template."""
        await self._caller(context, "ListRules", _READERS)
        core = self.srv.core
        filt = pb.StatsRequest()
        filt.CopyFrom(request.filter)
        filt.type = pb.STATS_TYPE_RULES
        aid_filter = {"agent_id": request.agent_id, "model_id": request.model_id}
        reqs = [] if request.desired else core.stats_requests(filt, **aid_filter)
        try:
            desired = core.durable.desired_rules(
                filt, time.monotonic(), template=request.desired or not reqs, **aid_filter
            )
        except ProtocolError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        live = {core.sessions[sid].agent_id for sid in core.sessions_of()}
        futs = [(aid, self.srv.expect_reply(sid, env.xid)) for sid, env, aid in reqs]
        self.srv.dispatch(Step(send=[(sid, env) for sid, env, _ in reqs]))
        out = admin_pb2.ListRulesResponse()
        for aid, fut in futs:
            entry = out.agents.add(agent_id=aid, connected=True)
            try:
                env = await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
            except TimeoutError:
                entry.error.text = "no STATS_REPLY in time"
                continue
            if env.HasField("error"):
                entry.error.CopyFrom(env.error)
            else:
                entry.rules.extend(env.stats_reply.rules)
        asked = {aid for _, _, aid in reqs}
        for scope, stats in desired:
            if scope not in asked:
                connected = scope != TEMPLATE and scope in live
                out.agents.add(agent_id=scope, rules=stats, desired=True, connected=connected)
        return out

    async def Unblock(
        self, request: admin_pb2.UnblockRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnblockResponse:
        """Lift a source tracing block here, and on every controller of the cluster."""
        who = await self._caller(context, "Unblock", _WRITERS, request)
        if not request.agent_id or not request.source_id:
            await self._journal(who, "Unblock", request, "invalid: agent_id and source_id")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Unblock: agent_id and source_id are required"
            )
        key = (request.agent_id, request.source_id)
        was = key in self.srv.core.durable.blocked
        self.srv.dispatch(self.srv.core.unblock(key, time.monotonic()))
        outcome = "ok" if was else "not blocked here"
        await self._journal(who, "Unblock", request, outcome)
        log.info(
            "admin Unblock by %s: source %r on agent %r: %s",
            who,
            request.source_id,
            request.agent_id,
            outcome,
        )
        return admin_pb2.UnblockResponse(was_blocked=was)

    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        await self._caller(context, "ListAgents", _READERS)
        now = time.monotonic()
        out = admin_pb2.ListAgentsResponse()
        for sid in self.srv.core.sessions_of():
            s = self.srv.core.sessions[sid]
            out.agents.add(
                agent_id=s.agent_id,
                peer=s.peer,
                model_ids=sorted(s.models),
                connected_s=now - s.opened_at,
                pkg_in=s.pkg_in_count,
            )
        return out
