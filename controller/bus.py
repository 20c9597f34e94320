"""The east-west bus between controllers: the MQTT 5 shell (aiomqtt) around
:class:`controller.cluster.ClusterState`, on the controller's asyncio loop.

It only moves bytes and time: it connects to the broker (``mqtts://`` with the
controller's certificate; the broker's must name a ``broker/*`` identity), subscribes to
``openexample/v1/cluster/#``, hands every message to the state (which decides), and
publishes what the state returns under this controller's own topics (see
controller/cluster.py and docs/architecture.md, "Several controllers"):

- on each (re)connect: its whole merged state (``state``, retained) and its load
  (``load``, retained; the connection's last will says it is down);
- each change its core makes: a ``delta`` (QoS 1, message expiry 60 s);
- then the load every ``workload_interval_s`` when it changed (every 10 s anyway), and
  the state again after changes, at most every ``snapshot_interval_s``.

A broker that is down never blocks scoring: publishing only queues (deltas made while
the bus is down are dropped and counted; the state published on reconnect carries
them), connecting happens in a task with backoff, and the controller serves alone
meanwhile. One WARNING when the bus goes down, one when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller import overflow
from controller.cluster import (
    DELTA,
    HEARTBEAT_S,
    LOAD,
    PREFIX,
    ROLE,
    RULES,
    STATE,
    BlockKey,
    Changes,
    ClusterState,
    topic,
)
from controller.config import ClusterConfig
from controller.metrics import ClusterMetrics
from openexample import tls
from openexample.identity import Kind
from openexample.limits import DEFAULT_MAX_MESSAGE_BYTES
from openexample.v1 import cluster_pb2 as cpb
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger("openexample.controller")
DELTA_EXPIRY_S = 60
MAX_OUTBOX = 1000
# MQTT 5 Maximum Packet Size in CONNECT: the broker drops (never sends) a bigger packet,
# so one peer cannot make this controller read and parse up to the broker's own limit
# (Mosquitto: 256 MB). The biggest message a controller sends is a snapshot of its
# replicated state (~220 bytes an RT entry: 100k entries ~22 MB) or a forwarded PKG_IN
# (at most the channel's 32 MiB): the cap is above both.
MAX_PACKET_BYTES = DEFAULT_MAX_MESSAGE_BYTES + (1 << 20)
MAX_QUEUED_INCOMING = 10_000  # messages waiting for this loop; past it aiomqtt drops them
REFUSAL_LOG_S = 10.0  # one WARNING per (sender, reason) per this long


def connect_properties() -> Properties:
    """The CONNECT's MQTT 5 properties: the largest packet this controller takes."""
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = MAX_PACKET_BYTES
    return props


class BrokerRefused(Exception):
    """The broker's certificate does not name a broker/* identity."""


class ClusterBus:
    """``apply``: called with the changes a peer's message made and the peer (the daemon
    applies them to its core); ``load``: (W, W0, service seconds per item) now.

    Work over W0 (controller/overflow.py): :meth:`forward` publishes a request, and
    ``answered(key, answer, peer)`` gets the neighbour's answer; requests from the
    neighbours go to ``work(sender, request, reply_to)`` while this controller takes
    work (:meth:`take_work`), and :meth:`answer` sends its answer back."""

    def __init__(
        self,
        settings: ClusterConfig,
        tls_files: tls.TlsFiles | None,
        state: ClusterState,
        metrics: ClusterMetrics,
        *,
        apply: Callable[[Changes, str], None],
        load: Callable[[], tuple[int, int, float]],
        work: Callable[[str, cpb.WorkRequest, tuple[str, bytes]], None] | None = None,
        answered: Callable[[int, cpb.WorkAnswer, str], None] | None = None,
        roles: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.settings = settings
        self._roles = roles  # mastership's topics (controller/roles.py)
        self._work = work
        self._answered = answered
        # in the shared subscription for work over W0 (when up)
        self._taking_work = work is not None and settings.overflow
        self._forwards: dict[int, float] = {}  # key -> unix deadline: awaiting an answer
        self._votes: dict[int, float] = {}  # key -> unix deadline: answers until then
        self._answers = overflow.answers_topic(state.identity)  # our response topic
        self.state = state
        self.metrics = metrics
        self._apply = apply
        self._load = load
        self._host, self._port = settings.host_port
        self._ssl = None
        if settings.tls:
            assert tls_files is not None, "mqtts:// needs the controller's TLS files"
            self._ssl = tls.client_context(tls_files)
        self._client: aiomqtt.Client | None = None  # set while connected
        # (topic, payload, retain, the metric's kind, MQTT 5 properties or None)
        self._outbox: asyncio.Queue[tuple[str, bytes, bool, str, Properties | None]] | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._down_since: float | None = None  # a "down" WARNING was logged
        self._ever_up = False
        self._published_version = -1  # the state version of the last snapshot sent
        self._last_snapshot = 0.0
        self._last_load: tuple[int, int, float] | None = None
        self._last_load_at = 0.0
        self._refusals_logged: dict[tuple[str, str], float] = {}

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def broker(self) -> str:
        return self.settings.broker

    # --- what the daemon calls ---

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-bus")

    def publish_local(
        self,
        now: float,
        *,
        rt: Iterable[tuple[str, pb.LabelEntry, float | None]] = (),
        blocks: Iterable[tuple[BlockKey, float | None]] = (),
        unblocked: Iterable[BlockKey] = (),
    ) -> None:
        """What this controller's core decided (unix-second expiries): merged into the
        state and published as a delta if the bus is up (else carried by the next
        snapshot). Never waits."""
        msg = self.state.local(now, rt=rt, blocks=blocks, unblocked=unblocked)
        if msg is None:
            return
        if not self._queue(topic(self.state.identity, DELTA), _bytes(msg), DELTA):
            self.metrics.dropped.inc()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Say this controller is down (retained load), then disconnect cleanly.

        The goodbye is the last load published: a clean disconnect discards the last
        will, so an "up" load after it (the ticker's, or one still in the outbox) would
        be what the peers and the broker keep, and they would count this controller up
        after it stopped (until PEER_SILENT_S)."""
        self._closing = True  # from now on no other load is queued or sent
        client = self._client
        if client is not None:
            w, w0, service = self._load()
            msg = self.state.workload(time.time(), w, w0, service, up=False)
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(
                    client.publish(
                        topic(self.state.identity, LOAD), _bytes(msg), qos=1, retain=True
                    ),
                    timeout_s / 2,
                )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(self._task, timeout_s / 2)

    # --- the connection loop ---

    def _new_client(self) -> aiomqtt.Client:
        will = aiomqtt.Will(
            topic(self.state.identity, LOAD),
            _bytes(self.state.will(time.time())),
            qos=1,
            retain=True,
        )
        return aiomqtt.Client(
            self._host,
            self._port,
            identifier=self.state.identity,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=self.settings.keepalive_s,
            timeout=max(2.0, float(self.settings.keepalive_s)),
            tls_context=self._ssl,
            properties=connect_properties(),
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
        )

    async def _run(self) -> None:
        delay = self.settings.reconnect_min_s
        while not self._closing:
            try:
                async with self._new_client() as client:
                    self._check_broker(client)
                    for leaf in (DELTA, STATE, LOAD):
                        await client.subscribe(f"{PREFIX}/+/+/{leaf}", qos=1)
                    if self._roles is not None:  # after the load: who is up comes first
                        for leaf in (ROLE, RULES):
                            await client.subscribe(f"{PREFIX}/+/+/{leaf}", qos=1)
                    await client.subscribe(f"{self._answers}/#", qos=0)
                    if self._taking_work:
                        await client.subscribe(overflow.work_subscription(), qos=0)
                    if self._work is not None:  # k-of-n consensus: every controller votes
                        await client.subscribe(f"{PREFIX}/+/+/{overflow.VOTE}", qos=0)
                    self._up(client)
                    delay = self.settings.reconnect_min_s
                    await self._serve(client)
            except asyncio.CancelledError:
                raise
            except (aiomqtt.MqttError, BrokerRefused, OSError, ssl.SSLError) as exc:
                self._down(exc)
            except Exception as exc:  # never let the bus take the daemon down
                log.exception("cluster bus failed")
                self._down(exc)
            if self._closing:
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.settings.reconnect_max_s)

    def _check_broker(self, client: aiomqtt.Client) -> None:
        """With TLS, the broker must prove a broker/* identity (the CA and the host name
        were checked in the handshake)."""
        if self._ssl is None:
            return
        paho = getattr(client, "_client", None)
        sock = paho.socket() if paho is not None else None
        if not isinstance(sock, ssl.SSLSocket):
            return  # this aiomqtt hides the socket: the CA and host name checks stand
        ident = tls.ssl_peer_identity(sock)
        if ident is None or ident.kind is not Kind.BROKER:
            raise BrokerRefused(
                f"the broker's certificate names {ident or 'no identity'}, not broker/*"
            )

    def _up(self, client: aiomqtt.Client) -> None:
        self._client = client
        paho = getattr(client, "_client", None)
        sock = paho.socket() if paho is not None else None
        if sock is not None:  # work, votes and answers are small request/response messages
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._outbox = asyncio.Queue()
        self.metrics.up.set(1)
        if self._down_since is not None:
            log.warning(
                "cluster bus back: connected to %s as %s after %.1f s alone",
                self.broker,
                self.state.identity,
                time.monotonic() - self._down_since,
            )
        else:
            log.info("cluster bus up: connected to %s as %s", self.broker, self.state.identity)
        self._down_since = None
        self._ever_up = True
        # What a peer that was cut off, or a broker that restarted, lacks: all of it.
        self._queue_snapshot()
        self._queue_load(force=True)

    def _down(self, exc: BaseException) -> None:
        was_up = self._client is not None
        self._client = None
        self._outbox = None
        self.metrics.up.set(0)
        if self._closing:
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            what = "lost the broker" if was_up else "cannot reach the broker"
            log.warning(
                "cluster bus down: %s %s (%s); serving alone, reconnecting",
                what,
                self.broker,
                " ".join(str(exc).split()) or type(exc).__name__,
            )

    async def _serve(self, client: aiomqtt.Client) -> None:
        writer = asyncio.create_task(self._writer(client), name="cluster-bus-writer")
        ticker = asyncio.create_task(self._ticker(), name="cluster-bus-ticker")
        try:
            async for message in client.messages:
                name = str(message.topic)
                data = message.payload
                data = data.encode() if isinstance(data, str) else bytes(data or b"")  # type: ignore[arg-type]
                if name.endswith(("/" + overflow.WORK, "/" + overflow.VOTE)):
                    self._on_work(name, data, message.properties)
                elif name.startswith(self._answers + "/"):
                    self._on_answer(name, data, message.properties)
                elif self._roles is not None and name.endswith(("/" + ROLE, "/" + RULES)):
                    self._roles(name, data)
                else:
                    self._on_message(name, data)
                if writer.done():  # a publish failed: the connection is gone
                    writer.result()
        finally:
            writer.cancel()
            ticker.cancel()
            await asyncio.gather(writer, ticker, return_exceptions=True)

    async def _writer(self, client: aiomqtt.Client) -> None:
        outbox = self._outbox
        assert outbox is not None
        expiry = Properties(PacketTypes.PUBLISH)
        expiry.MessageExpiryInterval = DELTA_EXPIRY_S
        while True:
            name, data, retain, kind, props = await outbox.get()
            if kind == LOAD and self._closing:
                continue  # built before the goodbye, which close() sends: it says up
            if props is not None:  # work and answers: at most once, they are late soon
                await client.publish(name, data, qos=0, properties=props)
            else:
                await client.publish(
                    name, data, qos=1, retain=retain, properties=None if retain else expiry
                )
            self.metrics.messages.labels("sent", kind).inc()

    def _queue(
        self,
        name: str,
        data: bytes,
        kind: str,
        *,
        retain: bool = False,
        props: Properties | None = None,
    ) -> bool:
        if self._outbox is None or self._outbox.qsize() >= MAX_OUTBOX:
            return False
        self._outbox.put_nowait((name, data, retain, kind, props))
        return True

    # --- work over W0 (controller/overflow.py) ---

    def neighbours_free(self) -> bool:
        """Whether a peer is up, connected now, and under its W0."""
        return self._client is not None and any(
            p.workload < p.max_workload for p in self.state.peers_up(time.time())
        )

    def forward(self, key: int, request: cpb.WorkRequest, deadline: float) -> bool:
        """Publish ``request`` for whichever neighbour takes it; False when the bus is
        down (the caller answers OVERLOADED at its deadline)."""
        if not self._request(overflow.WORK, key, request, deadline):
            return False
        self._forwards[key] = deadline
        return True

    def vote(self, key: int, request: cpb.WorkRequest, deadline: float) -> bool:
        """Ask every other controller to score ``request`` (k-of-n consensus); False
        when the bus is down."""
        if not self._request(overflow.VOTE, key, request, deadline):
            return False
        now = time.time()
        for k in [k for k, t in self._votes.items() if t < now]:
            del self._votes[k]  # past their deadline: late answers are dropped
        self._votes[key] = deadline
        return True

    def _request(self, leaf: str, key: int, request: cpb.WorkRequest, deadline: float) -> bool:
        """``request`` on our ``leaf`` topic, answers asked on our answers topic."""
        request.deadline = deadline
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._answers
        props.CorrelationData = self._correlation(key)
        props.MessageExpiryInterval = max(1, math.ceil(deadline - time.time()))
        msg = self.state.message(time.time(), work=request)
        return self._queue(topic(self.state.identity, leaf), _bytes(msg), leaf, props=props)

    def peers_up(self) -> int:
        """Other controllers up, when this one is connected (0 otherwise)."""
        if self._client is None:
            return 0
        return len(self.state.peers_up(time.time()))

    def answer(self, reply_to: tuple[str, bytes], answer: cpb.WorkAnswer) -> None:
        """Answer a neighbour's request on its response topic, under our own leaf."""
        response_topic, correlation = reply_to
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        msg = self.state.message(time.time(), answer=answer)
        name = f"{response_topic}/{self.state.identity}"
        self._queue(name, _bytes(msg), overflow.ANSWERS, props=props)

    def take_work(self, want: bool) -> None:
        """Join or leave the shared subscription (a controller over W0 takes no work)."""
        if want == self._taking_work or self._work is None or not self.settings.overflow:
            return
        self._taking_work = want
        client = self._client
        if client is not None:
            call = client.subscribe if want else client.unsubscribe
            asyncio.get_running_loop().create_task(call(overflow.work_subscription()))

    def _correlation(self, key: int) -> bytes:
        return self.state.generation.to_bytes(8, "big") + key.to_bytes(8, "big")

    def _on_work(self, name: str, data: bytes, props: object) -> None:
        got = overflow.parse_request(name, data)
        response = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        if got.refused or got.request is None or not response or not correlation:
            self._refused("work", got.sender, got.refused or "no response topic or correlation")
            return
        if got.sender == self.state.identity or self._work is None:
            return  # our own, from before we left the shared subscription: its deadline answers
        if got.request.deadline <= time.time():
            return  # its agent has stopped waiting
        self.metrics.messages.labels("received", overflow.WORK).inc()
        self._work(got.sender, got.request, (str(response), bytes(correlation)))

    def _on_answer(self, name: str, data: bytes, props: object) -> None:
        got = overflow.parse_answer(name, data, self.state.identity)
        correlation = bytes(getattr(props, "CorrelationData", b"") or b"")
        if got.refused or got.answer is None:
            self._refused("answer", got.sender, got.refused)
            return
        gen, key = correlation[:8], int.from_bytes(correlation[8:16], "big")
        if len(correlation) != 16 or gen != self.state.generation.to_bytes(8, "big"):
            return  # for an earlier run of ours
        if self._answered is None:
            return
        if self._forwards.pop(key, None) is None and self._votes.get(key, 0.0) < time.time():
            return  # answered already, or late
        self.metrics.messages.labels("received", overflow.ANSWERS).inc()
        self._answered(key, got.answer, got.sender)

    def publish_retained(self, leaf: str, msg: cpb.BusMessage) -> bool:
        """``msg`` retained on this controller's ``leaf`` topic (QoS 1); False when the
        bus is down (the caller publishes again when it is back)."""
        return self._queue(topic(self.state.identity, leaf), _bytes(msg), leaf, retain=True)

    def refused(self, reason: str, sender: str, text: str) -> None:
        """A bus message refused: counted, and one WARNING per (sender, reason) per
        REFUSAL_LOG_S."""
        self._refused(reason, sender, text)

    def _refused(self, reason: str, sender: str, text: str) -> None:
        self.metrics.refused.labels(reason).inc()
        key = (sender, reason)
        now = time.monotonic()
        if now - self._refusals_logged.get(key, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            self._refusals_logged[key] = now
            log.warning("cluster bus: refused a message (%s): %s", reason, text)

    async def _ticker(self) -> None:
        settings = self.settings
        # HEARTBEAT_S too: peers count a controller silent for PEER_SILENT_S as gone
        interval = min(settings.workload_interval_s, settings.snapshot_interval_s, HEARTBEAT_S)
        while True:
            await asyncio.sleep(interval)
            self._queue_load()
            now = time.monotonic()
            if (
                self.state.version != self._published_version
                and now - self._last_snapshot >= self.settings.snapshot_interval_s
            ):
                self._queue_snapshot()

    def _queue_snapshot(self) -> None:
        if self._outbox is None:
            return
        msg = self.state.snapshot(time.time())
        self._published_version = self.state.version
        self._last_snapshot = time.monotonic()
        self._queue(topic(self.state.identity, STATE), _bytes(msg), STATE, retain=True)

    def _queue_load(self, *, force: bool = False) -> None:
        if self._outbox is None or self._closing:
            return
        load = self._load()
        w, w0, service = load
        rounded = (w, w0, round(service, 6))
        now = time.monotonic()
        if not force and rounded == self._last_load and now - self._last_load_at < HEARTBEAT_S:
            return
        self._last_load, self._last_load_at = rounded, now
        msg = self.state.workload(time.time(), w, w0, service)
        self._queue(topic(self.state.identity, LOAD), _bytes(msg), LOAD, retain=True)

    # --- what arrives ---

    def _on_message(self, name: str, payload: object) -> None:
        data = payload.encode() if isinstance(payload, str) else bytes(payload or b"")  # type: ignore[arg-type]
        got = self.state.receive(name, data, time.time())
        if got.refused:
            self.metrics.refused.labels(got.reason).inc()
            key = (got.sender, got.reason)
            now = time.monotonic()
            if now - self._refusals_logged.get(key, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
                self._refusals_logged[key] = now
                log.warning("cluster bus: refused a message (%s): %s", got.reason, got.refused)
            return
        if got.sender != self.state.identity:
            self.metrics.messages.labels("received", got.kind).inc()
            if got.kind == DELTA:
                self.metrics.delta_delay.observe(max(0.0, time.time() - got.sent_at))
        if got.changes:
            self._apply(got.changes, got.sender)
            c = got.changes
            for change, n in (
                ("rt", len(c.rt)),
                ("rt_removed", len(c.rt_removed)),
                ("block", len(c.blocks)),
                ("unblock", len(c.unblocked)),
            ):
                if n:
                    self.metrics.applied.labels(change).inc(n)


def _bytes(msg: cpb.BusMessage) -> bytes:
    return msg.SerializeToString()
