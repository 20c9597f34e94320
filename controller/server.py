"""The controller daemon's I/O shell: grpc.aio + uvloop around ControllerCore.

Per agent stream: a reader feeds bytes to the core, a writer drains the session's
queue. One scoring task batches waiting PKG_INs across agents and runs the detector
pipeline. Health, reflection, the admin API and Prometheus ride along.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from controller.config import Config
from controller.core import ControllerCore, InspectJob, Step
from controller.journal import Journal
from controller.metrics import ControllerMetrics
from controller.pipeline import Scorer, score_jobs
from openexample.errors import ProtocolError
from openexample.limits import DEFAULT_LIMITS
from openexample.v1 import admin_pb2, admin_pb2_grpc
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger("openexample.controller")
SERVICE = "openexample.v1.OpenExample"
REPLY_TIMEOUT_S = 2.0


class ControllerServer:
    def __init__(
        self,
        cfg: Config,
        scorers: Mapping[str, Scorer],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        self.scorers = dict(scorers)
        self.core = ControllerCore(cfg, set(self.scorers), time.monotonic())
        self.registry = registry or CollectorRegistry()
        self.metrics = ControllerMetrics(
            self.registry,
            cfg.budget_us / 1e6,
            cfg.max_workload,
            models=sorted(self.scorers),
            core=self.core,
        )
        self.journal = Journal(cfg.journal)
        self.port = 0
        self.metrics_port = 0
        self._queues: dict[int, asyncio.Queue[bytes | None]] = {}
        # Admitted jobs wait here until the next loop iteration: everything that arrived
        # in the meantime, from any agent, is scored as one batch (no extra task hop).
        self._pending: list[InspectJob] = []
        self._score_scheduled = False
        self._waiters: dict[tuple[int, int], asyncio.Future[pb.Envelope]] = {}
        self._tasks: list[asyncio.Task] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._draining = False
        self._stopped = asyncio.Event()

    # --- lifecycle ---

    async def start(self) -> None:
        server = grpc.aio.server(options=DEFAULT_LIMITS.grpc_options())
        handler = grpc.stream_stream_rpc_method_handler(self._connect)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),)
        )
        admin_pb2_grpc.add_ControllerAdminServicer_to_server(_Admin(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (
            SERVICE,
            admin_pb2.DESCRIPTOR.services_by_name["ControllerAdmin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(self.cfg.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.cfg.listen}")
        await server.start()
        self._server = server
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.metrics_port >= 0:
            httpd, _ = start_http_server(self.cfg.metrics_port, "127.0.0.1", self.registry)
            self._httpd = httpd
            self.metrics_port = httpd.server_port
        self._tasks = [
            asyncio.create_task(self._tick_loop(), name="tick"),
            asyncio.create_task(self._journal_loop(), name="journal"),
        ]
        host = self.cfg.listen.rpartition(":")[0]
        log.info(
            "controller %s listening on %s:%d, metrics on http://127.0.0.1:%d/metrics,"
            " journal %s, detectors for %s",
            self.cfg.controller_id,
            host,
            self.port,
            self.metrics_port,
            self.cfg.journal,
            sorted(self.scorers) or "no model",
        )

    async def stop(self, grace_s: float = 2.0) -> None:
        """Drain: refuse new work, answer what is queued, close sessions, flush."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = self.core.draining = True
        await self._health.enter_graceful_shutdown()
        # Drain: what was admitted is scored and answered before the sessions close.
        while self._pending:
            self._score_pending()
        for sid in list(self._queues):
            self._dispatch(
                self.core.close_session(sid, "controller shutting down", time.monotonic())
            )
        if self._server is not None:
            await self._server.stop(grace_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.journal.close)
        if getattr(self, "_httpd", None) is not None:
            self._httpd.shutdown()
        self._stopped.set()
        log.info("controller stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- agent streams ---

    async def _connect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller shutting down")
        sid, hello = self.core.open_session(time.monotonic())
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queues[sid] = queue
        self.metrics.sessions.labels("opened").inc()
        for env in hello:
            queue.put_nowait(env.SerializeToString())
        reader = asyncio.create_task(self._read(sid, requests, queue))
        try:
            while (data := await queue.get()) is not None:
                self.metrics.sent_bytes.inc(len(data))
                yield data
        finally:
            reader.cancel()
            self._queues.pop(sid, None)
            self._dispatch(self.core.close_session(sid, "stream ended", time.monotonic()))
            self.metrics.agents.set(len(self.core.sessions_of()))

    async def _read(
        self, sid: int, requests: AsyncIterator[bytes], queue: asyncio.Queue[bytes | None]
    ) -> None:
        try:
            async for data in requests:
                self.metrics.received_bytes.inc(len(data))
                step = self.core.on_bytes(sid, data, time.monotonic())
                if step.jobs or step.verdicts:  # a PKG_IN: admitted, or answered at once
                    model = step.jobs[0].pkg.model_id if step.jobs else step.verdicts[0][0]
                    n = step.jobs[0].size if step.jobs else len(step.verdicts)
                    self.metrics.pkg_in_received(model, n, len(data))
                self._dispatch(step)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except Exception:  # the daemon never dies of what a peer sends
            log.exception("session %d: reader failed", sid)
            self.metrics.sessions.labels("errored").inc()
        queue.put_nowait(None)

    def _dispatch(self, step: Step) -> None:
        for sid, env in step.send:
            q = self._queues.get(sid)
            if q is not None:
                data = env.SerializeToString()
                if env.HasField("pkg_out"):
                    self.metrics.pkg_out_sent(env.pkg_out.model_id, len(data))
                q.put_nowait(data)
        for job in step.jobs:
            self._pending.append(job)
        if step.jobs and not self._score_scheduled:
            self._score_scheduled = True
            asyncio.get_running_loop().call_soon(self._score_pending)
        if step.incidents:
            self.journal.record(step.incidents, time.time() - time.monotonic())
            self.metrics.record_incidents(step.incidents)
        for sid, xid, env in step.replies:
            fut = self._waiters.pop((sid, xid), None)
            if fut is not None and not fut.done():
                fut.set_result(env)
        for sid, reason in step.closed:
            log.info("session %d closed: %s", sid, reason)
            self.metrics.sessions.labels("closed").inc()
            q = self._queues.get(sid)
            if q is not None:
                q.put_nowait(None)
        for name in step.errors:
            self.metrics.errors.labels(name).inc()
        if step.verdicts:
            self.metrics.verdicts_seen(step.verdicts)
        if step.overloaded:
            self.metrics.overloaded.inc(step.overloaded)
        if step.blocked:
            log.warning("source tracing blocked %s", step.blocked)
            self.metrics.blocked.inc(len(step.blocked))
        self.metrics.workload.set(self.core.workload)
        if step.closed or step.ready:
            self.metrics.agents.set(len(self.core.sessions_of()))

    def expect_reply(self, sid: int, xid: int) -> asyncio.Future[pb.Envelope]:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(sid, xid)] = fut
        return fut

    # --- background tasks ---

    async def _tick_loop(self) -> None:
        while True:
            self._dispatch(self.core.on_tick(time.monotonic()))
            deadline = self.core.next_deadline()
            delay = 0.2 if deadline is None else deadline - time.monotonic()
            await asyncio.sleep(min(max(delay, 0.005), 0.2))

    def _score_pending(self) -> None:
        """Score what is pending, up to the batch cap; the rest goes next iteration."""
        self._score_scheduled = False
        take = n = 0
        while take < len(self._pending) and n < self.cfg.max_batch_items:
            n += self._pending[take].size
            take += 1
        jobs = self._pending[:take]
        del self._pending[:take]
        if self._pending:  # readers run before the next batch
            self._score_scheduled = True
            asyncio.get_running_loop().call_soon(self._score_pending)
        if not jobs:
            return
        self.metrics.batch_items.observe(n)
        by_model: dict[str, list[InspectJob]] = defaultdict(list)
        for job in jobs:
            by_model[job.pkg.model_id].append(job)
        for model_id, group in by_model.items():
            results = score_jobs(self.scorers[model_id], group, self.metrics)
            now = time.monotonic()
            observe = self.metrics.latency_observer(model_id)
            for job, items in zip(group, results, strict=True):
                self._dispatch(self.core.on_results(job, items, now))
                observe(now - job.received_at)

    async def _journal_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(self.journal.flush)


class _Admin(admin_pb2_grpc.ControllerAdminServicer):
    """Operator API: rules add/list/del and the agents list."""

    def __init__(self, srv: ControllerServer) -> None:
        self.srv = srv

    async def ModRules(
        self, request: admin_pb2.ModRulesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ModRulesResponse:
        core = self.srv.core
        try:
            send, waits = core.mod_rules(
                request.mod,
                time.monotonic(),
                agent_id=request.agent_id,
                model_id=request.model_id,
            )
        except ProtocolError as err:
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
        self.srv._dispatch(Step(send=send))
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
        filt = pb.StatsRequest()
        filt.CopyFrom(request.filter)
        filt.type = pb.STATS_TYPE_RULES
        reqs = self.srv.core.stats_requests(
            filt, agent_id=request.agent_id, model_id=request.model_id
        )
        futs = [(aid, self.srv.expect_reply(sid, env.xid)) for sid, env, aid in reqs]
        self.srv._dispatch(Step(send=[(sid, env) for sid, env, _ in reqs]))
        out = admin_pb2.ListRulesResponse()
        for aid, fut in futs:
            entry = out.agents.add(agent_id=aid)
            try:
                env = await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
            except TimeoutError:
                entry.error.text = "no STATS_REPLY in time"
                continue
            if env.HasField("error"):
                entry.error.CopyFrom(env.error)
            else:
                entry.rules.extend(env.stats_reply.rules)
        return out

    async def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        now = time.monotonic()
        out = admin_pb2.ListAgentsResponse()
        for sid in self.srv.core.sessions_of():
            s = self.srv.core.sessions[sid]
            out.agents.add(
                agent_id=s.agent_id,
                model_ids=sorted(s.models),
                connected_s=now - s.opened_at,
                pkg_in=s.pkg_in_count,
            )
        return out
