"""The controller daemon's I/O shell: grpc.aio + uvloop around ControllerCore.

Agents connect over gRPC or the native channel (framed Envelopes on TCP or a Unix
socket, :mod:`controller.native`), both on the same loop and the same core. Every
session has a sender (:class:`Sender`): for gRPC the queue its response generator
drains, for the native channel the connection itself (``transport.write``). Inbound
messages from either go to :meth:`ControllerServer.on_message`, outbound ones leave
through :meth:`ControllerServer._dispatch`. One scoring pass batches waiting PKG_INs
across agents and runs the detector pipeline. Health, reflection, the admin API and
Prometheus ride along on gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from controller import native
from controller.admin import AdminService
from controller.config import Config, RuleConfig
from controller.core import ControllerCore, InspectJob, ScoreTimes, Step
from controller.desired import RulesDiff
from controller.journal import Journal
from controller.metrics import ControllerMetrics
from controller.pipeline import Scorer, expectations, score_jobs
from controller.session import State
from controller.store import Store
from openexample import grpc_tls, messages, metrics_http, tls
from openexample.addresses import Address
from openexample.errors import ProtocolError, bad_request
from openexample.identity import Identity
from openexample.limits import DEFAULT_LIMITS
from openexample.v1 import admin_pb2, admin_pb2_grpc
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb

if TYPE_CHECKING:  # the bus is imported only with a `cluster` section
    from controller.bus import ClusterBus
    from controller.cluster import Changes as ClusterChanges
    from controller.roles import Roles

log = logging.getLogger("openexample.controller")
SERVICE = "openexample.v1.OpenExample"


class Sender(Protocol):
    """A session's way out: ``send`` one serialized Envelope, ``close`` after the rest;
    ``backlog``: bytes written and not taken by the peer yet; ``discard``: drop them and
    end the stream (after ``last``, when the peer does not read)."""

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def backlog(self) -> int: ...

    def discard(self, last: bytes) -> None: ...


class _QueueSender:
    """gRPC: the queue the response generator of ``_connect`` drains (None ends it)."""

    __slots__ = ("pending", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending = 0  # bytes in the queue

    def send(self, data: bytes) -> None:
        self.pending += len(data)
        self.queue.put_nowait(data)

    def taken(self, data: bytes) -> None:
        self.pending -= len(data)

    def backlog(self) -> int:
        return self.pending

    def discard(self, last: bytes) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.pending = 0
        self.send(last)
        self.close()

    def close(self) -> None:
        self.queue.put_nowait(None)


class ControllerServer:
    def __init__(
        self,
        cfg: Config,
        scorers: Mapping[str, Scorer],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """TLS comes from ``cfg`` (ConfigError here when its files are missing, unreadable
        or expired); ``cfg.plaintext`` turns it off, on loopback only."""
        self.cfg = cfg
        self.tls = cfg.tls_files()
        self.scorers = dict(scorers)
        self.core = ControllerCore(
            cfg, set(self.scorers), time.monotonic(), expected=expectations(self.scorers)
        )
        self.registry = registry or CollectorRegistry()
        self.metrics = ControllerMetrics(
            self.registry,
            cfg.budget_us / 1e6,
            cfg.max_workload,
            models=sorted(self.scorers),
            core=self.core,
        )
        self.journal = Journal(cfg.journal)
        # Desired rules and blocks, in the journal's file (controller/store.py); read
        # back in start(), before anything listens.
        self.store = Store(cfg.journal)
        self.port = 0
        self.metrics_port = 0
        self.native_addresses: list[Address] = []  # as bound (tcp port 0 resolved)
        self._native: list[native.NativeListener] = []
        self._senders: dict[int, Sender] = {}
        # Admitted jobs wait here until the next loop iteration: everything that arrived
        # in the meantime, from any agent, is scored as one batch (no extra task hop).
        self._pending: list[InspectJob] = []
        self._score_scheduled = False
        self._waiters: dict[tuple[int, int], asyncio.Future[pb.Envelope]] = {}
        self._tasks: list[asyncio.Task] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._draining = False
        self._serving = False  # started and not draining: what /readyz says
        self._stopped = asyncio.Event()
        self._mismatch_logged: set[tuple[str, str]] = set()
        self._service_s = 0.0  # scoring seconds per item, a moving average (the bus's load)
        # Several controllers (controller/bus.py, controller/cluster.py): without a
        # `cluster` section this controller runs alone.
        self.bus: ClusterBus | None = None
        self.roles: Roles | None = None  # mastership in the agent group (controller/roles.py)
        if cfg.cluster is not None:
            from controller.bus import ClusterBus
            from controller.cluster import ClusterState
            from controller.metrics import ClusterMetrics

            state = ClusterState(cfg.cluster_identity(), time.time_ns() // 1_000_000)
            self.bus = ClusterBus(
                cfg.cluster,
                self.tls,
                state,
                ClusterMetrics(self.registry, lambda: list(state.peers.values())),
                apply=self._apply_cluster,
                load=lambda: (self.core.workload, self.cfg.max_workload, self._service_s),
                work=self._on_work if cfg.cluster.overflow else None,
                answered=self._on_answered,
                roles=lambda name, data: self.roles.on_bus(name, data),  # type: ignore[union-attr]
            )
            self.roles = _roles(cfg, self)

    # --- lifecycle ---

    async def start(self) -> None:
        self._load_desired_state()
        server = grpc.aio.server(options=DEFAULT_LIMITS.grpc_options())
        handler = grpc.stream_stream_rpc_method_handler(self._connect)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": handler}),)
        )
        admin_pb2_grpc.add_ControllerAdminServicer_to_server(AdminService(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (
            SERVICE,
            admin_pb2.DESCRIPTOR.services_by_name["ControllerAdmin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        grpc_address = self.cfg.grpc_listen
        if self.tls is None:
            log.warning(
                "PLAINTEXT: no TLS and no authentication on %s: anyone who can reach these"
                " addresses can connect as any agent and change rules (development only)",
                ", ".join(str(a) for a in self.cfg.listeners),
            )
        native_ssl = None if self.tls is None else tls.server_context(self.tls)
        try:  # grpc says 0, or (newer) raises RuntimeError, for a port it cannot bind
            if self.tls is None:
                self.port = server.add_insecure_port(grpc_address.host_port)
            else:
                creds = grpc_tls.grpc_server_credentials(self.tls)
                self.port = server.add_secure_port(grpc_address.host_port, creds)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {grpc_address} (address in use, or not this host's)")
        try:
            for address in self.cfg.native_listen:
                self._native.append(
                    await native.listen(
                        self, address, DEFAULT_LIMITS.max_message_bytes, ssl=native_ssl
                    )
                )
        except BaseException:
            for listener in self._native:
                listener.close()
            raise
        self.native_addresses = [listener.address for listener in self._native]
        try:
            if self.cfg.metrics_port >= 0:  # before serving: a port in use stops the start
                self._start_metrics()
        except BaseException:
            for listener in self._native:
                listener.close()
            raise
        await server.start()
        self._server = server
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True  # /readyz: listening, detectors loaded
        self._tasks = [
            asyncio.create_task(self._tick_loop(), name="tick"),
            asyncio.create_task(self._journal_loop(), name="journal"),
        ]
        if self.bus is not None:
            log.info("cluster: east-west bus on %s as %s", self.bus.broker, self.bus.state.identity)
            self.bus.start()
        for address in self.native_addresses:
            log.info("native listening on %s", address)
        host = grpc_address.host_port.rpartition(":")[0]
        scheme = "https" if self.cfg.metrics_tls else "http"
        log.info(
            "controller %s listening on %s:%d (%s), metrics on %s://%s:%d/metrics,"
            " journal %s, detectors for %s",
            self.cfg.controller_id,
            host,
            self.port,
            "plaintext" if self.tls is None else "mTLS",
            scheme,
            self.cfg.metrics_addr,
            self.metrics_port,
            self.cfg.journal,
            sorted(self.scorers) or "no model",
        )

    def _load_desired_state(self) -> None:
        """The stored desired rules and blocks, then the config's rules on top (what
        changed in the config since is applied, and logged); before anything listens."""
        now = time.monotonic()
        try:
            stored = self.store.load(time.time() - now)
        except (sqlite3.Error, ValueError) as exc:  # refuse to run without the operator's rules
            raise OSError(f"cannot read the desired state in {self.cfg.journal}: {exc}") from None
        step = self.core.restore(stored, now)
        config_step, _ = self.core.reload_rules(self.cfg.rules, now)
        self._dispatch(step.merge(config_step))
        if self.cfg.rules:
            log.info(
                "config rules in force: %s",
                "; ".join(r.describe() for r in self.cfg.rules),
            )

    def reload_rules(self, specs: tuple[RuleConfig, ...]) -> RulesDiff:
        """SIGHUP: the config file's rules replace the config rules in force; the diff
        is logged and journaled, and applied to desired state and live agents."""
        step, diff = self.core.reload_rules(specs, time.monotonic())
        self._dispatch(step)
        log.info("SIGHUP: config rules reloaded: %s", diff.summary())
        self._journal_reload(diff.summary(), "ok")
        return diff

    def reload_refused(self, reason: str) -> None:
        """SIGHUP with a config that does not load: one log line, nothing changes."""
        log.error("SIGHUP: config not reloaded, rules unchanged: %s", reason)
        self._journal_reload(reason, "invalid")

    def _journal_reload(self, text: str, outcome: str) -> None:
        request = json.dumps({"config_rules": text})
        asyncio.get_running_loop().run_in_executor(
            None, self.journal.record_admin, time.time(), "config", "ReloadRules", request, outcome
        )

    def _persist(self, step: Step) -> None:
        """Store what the step changed in desired state, before anything is sent."""
        tables = {scope: self.core.durable.desired(scope) for scope in step.persist}
        blocks = self.core.durable.blocks() if step.persist_blocks else None
        try:
            self.store.write(tables, blocks, time.time() - time.monotonic())
        except sqlite3.Error as exc:  # the daemon goes on; a restart would lose this change
            log.error("desired state not stored (%s): %s", ", ".join(sorted(tables)), exc)

    def _ready(self) -> bool:
        return self._serving and not self._draining

    def _start_metrics(self) -> None:
        cfg = self.cfg
        files = self.tls if cfg.metrics_tls else None
        try:
            httpd, _ = metrics_http.serve(
                cfg.metrics_port, cfg.metrics_addr, self.registry, ready=self._ready, tls=files
            )
        except OSError as exc:
            where = f"{cfg.metrics_addr}:{cfg.metrics_port}"
            raise OSError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        self._httpd = httpd
        self.metrics_port = httpd.server_port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Drain: refuse new work, answer what is queued, close sessions, flush."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = self.core.draining = True
        await self._health.enter_graceful_shutdown()
        for listener in self._native:
            listener.close()
        # Drain: what was admitted is scored and answered before the sessions close.
        while self._pending:
            self._score_pending()
        for sid in list(self._senders):
            self._dispatch(
                self.core.close_session(sid, "controller shutting down", time.monotonic())
            )
        if self._server is not None:
            await self._server.stop(grace_s)
        if self.bus is not None:
            await self.bus.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.journal.close)
        self.store.close()
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
        sender = _QueueSender()
        identity = tls.grpc_peer_identity(context) if self.tls else None
        sid = self.open_stream(sender, identity, peer=context.peer())
        queue = sender.queue
        reader = asyncio.create_task(self._read(sid, requests, sender))
        try:
            while (data := await queue.get()) is not None:
                sender.taken(data)
                yield data
        finally:
            reader.cancel()
            self.end_stream(sid, "stream ended")

    async def _read(self, sid: int, requests: AsyncIterator[bytes], sender: _QueueSender) -> None:
        try:
            async for data in requests:
                self.on_message(sid, data)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        except Exception:  # the daemon never dies of what a peer sends
            log.exception("session %d: reader failed", sid)
            self.metrics.sessions.labels("errored").inc()
        sender.close()

    # --- what both shells call (gRPC above, controller/native.py) ---

    @property
    def accepting(self) -> bool:
        return not self._draining

    def open_stream(
        self, sender: Sender, identity: Identity | None = None, *, peer: str = ""
    ) -> int:
        """A new session whose messages leave through ``sender``; its HELLO goes now.
        ``identity``: what the peer's verified certificate says (None: plaintext);
        ``peer``: its address, as the admin API's ListAgents shows it."""
        sid, hello = self.core.open_session(time.monotonic(), identity)
        self.core.sessions[sid].peer = peer
        self._senders[sid] = sender
        self.metrics.sessions.labels("opened").inc()
        self._dispatch(Step(send=[(sid, env) for env in hello]))
        return sid

    def on_message(self, sid: int, data: bytes) -> None:
        """One message from the session's peer."""
        self.metrics.received_bytes.inc(len(data))
        step = self.core.on_bytes(sid, data, time.monotonic())
        if step.jobs or step.verdicts:  # a PKG_IN: admitted, or answered at once
            model = step.jobs[0].pkg.model_id if step.jobs else step.verdicts[0][0]
            n = step.jobs[0].size if step.jobs else len(step.verdicts)
            self.metrics.pkg_in_received(model, n, len(data))
        self._dispatch(step)

    def end_stream(self, sid: int, reason: str, *, errored: bool = False) -> None:
        """The stream is gone (or must go): close the session if the core has not."""
        if errored:
            self.metrics.sessions.labels("errored").inc()
        if self._senders.pop(sid, None) is None:
            return  # the core closed it already (step.closed)
        self._dispatch(self.core.close_session(sid, reason, time.monotonic()))
        self.metrics.agents.set(len(self.core.sessions_of()))

    def refuse_stream(self, sid: int, err: ProtocolError, offending: bytes) -> None:
        """A message the channel cannot even frame (oversize): a typed ERROR, then close."""
        s = self.core.sessions.get(sid)
        sender = self._senders.get(sid)
        if s is not None and sender is not None:
            env = messages.error_envelope(err, offending, s.session.version)
            self._dispatch(Step(send=[(sid, env)], errors=[err.name]))
        self.end_stream(sid, f"{err.name}: {err.text}")
        if sender is not None:
            sender.close()

    def negotiated_limit(self, sid: int) -> int | None:
        """The message limit in force once HELLO is done (None before, or if gone)."""
        s = self.core.sessions.get(sid)
        if s is None or s.state is State.HELLO:
            return None
        return s.session.limits.max_message_bytes

    def _dispatch(self, step: Step) -> None:
        if step.persist or step.persist_blocks:
            self._persist(step)  # stored first: what agents get is never only in memory
        for note in step.notes:
            log.info("desired state: %s", note)
        for sid, env in step.send:
            sender = self._senders.get(sid)
            if sender is not None:
                data = env.SerializeToString()
                if env.HasField("pkg_out"):
                    self.metrics.pkg_out_sent(env.pkg_out.model_id, len(data))
                self.metrics.sent_bytes.inc(len(data))
                sender.send(data)
                if sender.backlog() > self.cfg.max_outbox_bytes:
                    self._not_reading(sid, sender)
        if step.forwards or step.answers or step.votes:
            self._overflow(step)
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
            sender = self._senders.pop(sid, None)
            if sender is not None:
                sender.close()
        for name in step.errors:
            self.metrics.errors.labels(name).inc()
        if step.verdicts:
            self.metrics.verdicts_seen(step.verdicts)
        if step.overloaded:
            self.metrics.overloaded.inc(step.overloaded)
        for d in step.blocked:
            log.warning(
                "source tracing blocked source %r on agent %r: %.1f adversarial of %.1f"
                " verdicts, p=%.2g against a clean rate of %.3g",
                d.key[1],
                d.key[0],
                d.adversarial,
                d.verdicts,
                d.p_value,
                d.base_rate,
            )
            self.metrics.blocked.inc()
        for agent_id, models in step.undetected:
            log.warning(
                "agent %r declares %s, for which this controller has no detectors (it has"
                " them for %s): those inferences are answered UNKNOWN/NO_DETECTOR; check"
                " the agent's model id",
                agent_id,
                ", ".join(repr(m) for m in models),
                ", ".join(repr(m) for m in sorted(self.scorers)) or "no model",
            )
        for agent_id, model_id, theirs, ours in step.other_models:
            log.warning(
                "agent %r runs model %r as %s, but its detectors were trained with %s:"
                " detectors that read the model (margin) may be weaker; retrain them for"
                " this model (openexample-controller train --model ...)",
                agent_id,
                model_id,
                theirs or "a model without a digest",
                ours,
            )
        for sid, claimed, reason in step.refused:
            log.warning("session %d: agent %r refused at FEATURES: %s", sid, claimed, reason)
        for sid, agent_id in step.replaced:
            log.warning(
                "session %d: agent %r connected again; the old session is closed", sid, agent_id
            )
        for agent_id, model_id in step.fingerprint_mismatches:
            self.metrics.errors.labels("FINGERPRINT_MISMATCH").inc()
            if (agent_id, model_id) not in self._mismatch_logged:
                self._mismatch_logged.add((agent_id, model_id))
                log.warning(
                    "agent %r, model %r: a flagged input's fingerprint is not the controller's"
                    " own (different fingerprint_key, privacy noise, or a forged claim): its"
                    " verdicts are not pushed to other agents",
                    agent_id,
                    model_id,
                )
        self.metrics.workload.set(self.core.workload)
        if step.closed or step.ready:
            self.metrics.agents.set(len(self.core.sessions_of()))
        if self.bus is not None and (step.rt_added or step.blocks_added or step.blocks_removed):
            self._replicate(step)
        if self.roles is not None and (step.ready or step.persist):
            if step.persist:
                self.roles.rules_changed()  # the master publishes its rules
            self.roles.on_ready(step.ready)  # the master claims new agents

    # --- several controllers: the core's decisions out, the peers' in ---

    def _replicate(self, step: Step) -> None:
        """RT entries, blocks and unblocks this core decided, to the other controllers
        (expiries from core time to unix time: they cross machines)."""
        assert self.bus is not None
        wall_now = time.time()
        offset = wall_now - time.monotonic()

        def wall(t: float | None) -> float | None:
            return None if t is None else t + offset

        self.bus.publish_local(
            wall_now,
            rt=[(m, e, wall(t)) for m, e, t in step.rt_added],
            blocks=[(k, wall(t)) for k, t in step.blocks_added],
            unblocked=step.blocks_removed,
        )

    def _apply_cluster(self, changes: ClusterChanges, sender: str) -> None:
        """What another controller decided (a merge's changes), applied by the core and
        carried out like its own steps."""
        now = time.monotonic()
        offset = time.time() - now

        def core_time(t: float | None) -> float | None:
            return None if t is None else t - offset

        lifted = [k for k in changes.unblocked if k in self.core.durable.blocked]
        step = self.core.apply_remote(
            now,
            rt=[(m, e, core_time(t)) for m, e, t in changes.rt],
            rt_removed=changes.rt_removed,
            blocks=[(k, core_time(t)) for k, t in changes.blocks],
            unblocked=changes.unblocked,
        )
        for (agent_id, source_id), _ in changes.blocks:
            log.info(
                "cluster: source %r on agent %r blocked (from %s)", source_id, agent_id, sender
            )
        for agent_id, source_id in lifted:
            log.info(
                "cluster: source %r on agent %r unblocked (from %s)", source_id, agent_id, sender
            )
        self._dispatch(step)

    def _overflow(self, step: Step) -> None:
        """Work over W0 to the neighbours, and answers to theirs (controller/overflow.py)."""
        bus = self.bus
        for reply_to, answer in step.answers:
            if bus is not None:
                bus.answer(reply_to, answer)  # type: ignore[arg-type]
        now = time.monotonic()
        offset = time.time() - now
        for f in step.forwards:
            if bus is None or not bus.forward(f.key, f.request, f.deadline + offset):
                # the bus is down: no neighbour will answer, so say so now
                self._dispatch(self.core.on_forward_answer(f.key, None, "", 0, now))
        for key, request, deadline in step.votes:
            if bus is None or not bus.vote(key, request, deadline + offset):
                self._dispatch(self.core.on_vote_failed(key, now))
        if step.forwards and bus is not None:
            bus.take_work(False)  # over W0: take no neighbour's work

    def _on_work(self, sender: str, request: cpb.WorkRequest, reply_to: tuple[str, bytes]) -> None:
        self._dispatch(self.core.admit_work(sender, request, reply_to, time.monotonic()))

    def _on_answered(self, key: int, answer: cpb.WorkAnswer, peer: str) -> None:
        pkg_out = answer.pkg_out if answer.HasField("pkg_out") else None
        if pkg_out is None:
            log.info("cluster: %s refused work: %s", peer, answer.detail or "no reason")
        now = time.monotonic()
        if key in self.core.ballots:
            self._dispatch(self.core.on_vote(key, pkg_out, peer, now))
        else:
            self._dispatch(self.core.on_forward_answer(key, pkg_out, peer, answer.refused, now))

    def _overflow_tick(self) -> None:
        """Whether a neighbour can take work now, and whether this one takes theirs
        (out of the shared subscription at W0, back in under half of it)."""
        bus = self.bus
        if bus is None:
            return
        if self.roles is not None:
            self.roles.tick()
        self.core.neighbours_free = self.cfg.cluster.overflow and bus.neighbours_free()
        self.core.peers_up = bus.peers_up()
        w, w0 = self.core.workload, self.cfg.max_workload
        if w < w0 / 2:
            bus.take_work(True)
        elif w >= w0:
            bus.take_work(False)

    def _not_reading(self, sid: int, sender: Sender) -> None:
        """The peer lets more than max_outbox_bytes pile up: what waits is dropped, a
        typed ERROR goes last, the stream ends (memory stays bounded whatever it does)."""
        backlog = sender.backlog()
        err = bad_request(
            pb.BAD_REQUEST_CODE_NOT_READING,
            f"{backlog} bytes wait to be sent and the peer does not read them"
            f" (limit {self.cfg.max_outbox_bytes})",
        )
        log.warning("session %d: %s; closing", sid, err)
        self.metrics.errors.labels(err.name).inc()
        s = self.core.sessions.get(sid)
        version = s.session.version if s is not None else messages.PROTOCOL_VERSION
        self._senders.pop(sid, None)
        sender.discard(messages.error_envelope(err, b"", version).SerializeToString())
        self._dispatch(self.core.close_session(sid, f"{err.name}", time.monotonic()))

    def dispatch(self, step: Step) -> None:
        """Carry out a step the admin API made (store, send, record)."""
        self._dispatch(step)

    def expect_reply(self, sid: int, xid: int) -> asyncio.Future[pb.Envelope]:
        """A future for the agent's reply to ``xid``; the caller cancels it when it stops
        waiting, and it is forgotten then (an agent that never answers leaves nothing)."""
        fut = asyncio.get_running_loop().create_future()
        key = (sid, xid)
        self._waiters[key] = fut

        def forget(f: asyncio.Future[pb.Envelope]) -> None:
            if self._waiters.get(key) is f:
                del self._waiters[key]

        fut.add_done_callback(forget)
        return fut

    # --- background tasks ---

    async def _tick_loop(self) -> None:
        while True:
            self._overflow_tick()
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
        self.metrics.observe_batch_items(n)
        by_model: dict[str, list[InspectJob]] = defaultdict(list)
        for job in jobs:
            by_model[job.pkg.model_id].append(job)
        for model_id, group in by_model.items():
            # Stage timings (PKG_OUT Timings, stage_seconds): measured here, put in
            # PKG_OUT by the core. `now` is read per job: its reply stage includes
            # answering the jobs before it.
            detector_s: list[tuple[str, float]] = []
            started = time.monotonic()
            results = score_jobs(self.scorers[model_id], group, self.metrics, detector_s)
            done = time.monotonic()
            per_item = (done - started) / max(1, sum(j.size for j in group))
            self._service_s = (
                per_item if not self._service_s else 0.9 * self._service_s + 0.1 * per_item
            )
            times = ScoreTimes(started, done, sum(j.size for j in group), tuple(detector_s))
            observe = self.metrics.latency_observer(model_id)
            queue, score, reply = self.metrics.stage_observers(model_id)
            for job, items in zip(group, results, strict=True):
                now = time.monotonic()
                self._dispatch(self.core.on_results(job, items, now, times))
                observe(now - job.received_at)
                queue(started - job.received_at)
                score(done - started)
                reply(now - done)

    async def _journal_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(self.journal.flush)


def _roles(cfg: Config, srv: ControllerServer) -> Roles:
    """The agent group's election for a controller on the bus (controller/roles.py)."""
    from controller.mastership import Election
    from controller.roles import Roles

    c = cfg.cluster
    assert c is not None and srv.bus is not None
    election = Election(
        srv.bus.state.identity,
        c.group,
        priority=c.priority,
        stands=c.role == "auto",
        lease_s=c.lease_s,
        members=frozenset(c.members),
    )
    if not c.members:
        log.warning(
            "cluster: agent group %r has no cluster.members: any controller certificate on"
            " the bus that names the group may claim its mastership and set its rules",
            c.group,
        )
    return Roles(
        election,
        srv.bus,
        srv.core,
        dispatch=srv.dispatch,
        expect_reply=srv.expect_reply,
    )
