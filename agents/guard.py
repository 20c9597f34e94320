"""The public face: ``attach(model, ...)`` -> :class:`Guard`; ``guard(x)`` -> :class:`Result`.

Per call: run the model on the caller's thread, then ``core.decide`` under the shared
lock. A local decision returns at once (no protobuf, no thread switch). An INSPECT
hands the input to the I/O thread (``loop.call_soon_threadsafe``, only when the outbox
was empty) and waits on a per-call lock for at most the rule's budget; the I/O thread
releases it when the verdict arrives. The asyncio API waits on a future instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from functools import partial
from time import perf_counter
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from agents.config import AgentConfig
from agents.core import AgentCore
from agents.metrics import AgentMetrics
from agents.models import ModelAdapter, wrap_model
from agents.results import ModelInfo, Result, Ticket
from agents.transport import Transport
from openexample import metrics_http, perceptual
from openexample.errors import ConfigError, one_line
from openexample.v1 import openexample_pb2 as pb

log = logging.getLogger(__name__)

_allocate_lock = threading.Lock
_exp = math.exp


def label_confidence(row: np.ndarray) -> tuple[int, float]:
    """argmax and its softmax probability for one logits row (lean for small C)."""
    if row.shape[0] <= 64:  # Python floats beat numpy's per-call overhead here
        vals = row.tolist()
        top = max(vals)
        total = 0.0
        for v in vals:
            total += _exp(v - top)
        return vals.index(top), 1.0 / total
    label = int(row.argmax())
    return label, float(1.0 / np.exp(row - row[label]).sum())


def _labels_confidences(logits: np.ndarray) -> tuple[list[int], list[float]]:
    labels = logits.argmax(axis=1)
    top = logits[np.arange(len(logits)), labels][:, None]
    conf = 1.0 / np.exp(logits - top).sum(axis=1)
    return labels.tolist(), conf.tolist()


def _wake_future(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Guard:
    """A model behind the vigilance loop. Thread-safe; build it with :func:`attach`."""

    def __init__(
        self,
        adapter: ModelAdapter,
        make_core: Callable[[tuple[int, ...]], AgentCore],
        config: AgentConfig,
        *,
        on_retraction: Callable[[Result], object] | None = None,
        registry: CollectorRegistry | None = None,
        model_executor: Executor | None = None,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self._make_core = make_core
        self._on_retraction = on_retraction
        self._lock = threading.Lock()
        self._bind_lock = threading.Lock()
        self._predict = adapter.predict
        self._executor = model_executor
        self._closed = False
        self.up = threading.Event()  # set by the transport while the session is in MAIN
        self.registry = registry if registry is not None else CollectorRegistry()
        self.core: AgentCore | None = None  # built once the input shape is known
        self.model_id: str | None = None
        self.transport: Transport | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._dtype = adapter.input_dtype
        self._metrics_server = None
        self.metrics_port: int | None = None  # the bound port (metrics_port 0 = any)
        if config.metrics_port is not None:
            files = config.tls_files() if config.metrics_tls else None
            if config.metrics_tls and files is None:
                raise ConfigError("metrics_tls: needs the agent's TLS files (plaintext is on)")
            server, _thread = metrics_http.serve(
                config.metrics_port,
                config.metrics_addr,
                self.registry,
                ready=self.up.is_set,  # /readyz: the session with the controller is up
                tls=files,
            )
            self._metrics_server = server
            self.metrics_port = server.server_port
        if adapter.input_shape is not None:
            self._bind(adapter.input_shape)

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Build the core and start the I/O thread once the input shape is known (at
        attach, or at the first call for a model that does not state it)."""
        with self._bind_lock:
            if self.core is not None or self._closed:
                return
            core = self._make_core(shape)
            (info,) = core.models.values()
            self.model_id = info.model_id
            self.metrics = AgentMetrics(core, self._lock, self.registry, (self.config.budget_us,))
            self._observe = self.metrics.observer(self.model_id)
            # PKG_IN carries wall-clock inference times; the core only knows ``now``.
            core.wall_offset_s = time.time() - perf_counter()
            self.transport = Transport(
                core,
                self._lock,
                # channels: gRPC, or native for tcp:// and unix://, per controller address
                up=self.up,
                on_retraction=self._on_retraction,
            )
            self.input_shape = info.input_shape
            self.core = core
            self.transport.start()

    # ---- synchronous API -----------------------------------------------------------

    def __call__(self, x: Any, *, source_id: str = "") -> Result:
        """One input (shape ``input_shape``, or with a batch dimension of 1)."""
        x = self._one(x)
        row = self._predict(x[None])[0]
        t0 = perf_counter()
        label, conf = label_confidence(row)
        core = self.core
        with self._lock:
            r, flush = core.decide(self.model_id, x, row, label, conf, source_id, t0)
            if r.__class__ is Ticket:
                waiter = _allocate_lock()
                waiter.acquire()
                r.wake = waiter.release
        if flush:
            self.transport.kick()
        if r.__class__ is Ticket:
            waiter.acquire(True, max(0.0, r.deadline - perf_counter()))
            res = r.result
            if res is None:  # budget over: the fail mode decides (or a verdict just won)
                with self._lock:
                    res = core.expire_ticket(r, perf_counter())
        else:
            res = r
        return self._finish(res, t0)

    def batch(self, xs: Any, *, source_id: str | Sequence[str] = "") -> list[Result]:
        """N inputs at once (``[N, *input_shape]``): one forward pass, one PKG_IN batch."""
        xs = self._many(xs)
        logits = self._predict(xs)
        t0 = perf_counter()
        tickets = self._submit(xs, logits, source_id, t0, None)
        out: list[Result] = []
        expired = []
        for r in tickets:
            if r.__class__ is Ticket:
                r.waiter.acquire(True, max(0.0, r.deadline - perf_counter()))
                if r.result is None:
                    expired.append(r)
        if expired:
            with self._lock:
                now = perf_counter()
                for r in expired:
                    self.core.expire_ticket(r, now)
        for r in tickets:
            out.append(self._finish(r.result if r.__class__ is Ticket else r, t0))
        return out

    # ---- asyncio API ---------------------------------------------------------------

    async def acall(self, x: Any, *, source_id: str = "") -> Result:
        """Like ``guard(x)``; waiting for the verdict never blocks the running loop."""
        return (await self.abatch(self._one(x)[None], source_id=source_id))[0]

    async def abatch(self, xs: Any, *, source_id: str | Sequence[str] = "") -> list[Result]:
        """Like :meth:`batch`, awaiting verdicts. The model runs on ``model_executor``
        when attach() was given one, else inline."""
        xs = self._many(xs)
        loop = asyncio.get_running_loop()
        if self._executor is not None:
            logits = await loop.run_in_executor(self._executor, self._predict, xs)
        else:
            logits = self._predict(xs)
        t0 = perf_counter()
        rs = self._submit(xs, logits, source_id, t0, loop)
        for r in rs:
            if r.__class__ is Ticket:
                fut = r.waiter
                timer = loop.call_later(max(0.0, r.deadline - perf_counter()), _wake_future, fut)
                await fut
                timer.cancel()
                if r.result is None:
                    with self._lock:
                        self.core.expire_ticket(r, perf_counter())
        return [self._finish(r.result if r.__class__ is Ticket else r, t0) for r in rs]

    # ---- shared --------------------------------------------------------------------

    def _submit(
        self,
        xs: np.ndarray,
        logits: np.ndarray,
        source_id: str | Sequence[str],
        t0: float,
        loop: asyncio.AbstractEventLoop | None,
    ) -> list[Result | Ticket]:
        n = len(xs)
        sources = [source_id] * n if isinstance(source_id, str) else list(source_id)
        if len(sources) != n:
            raise ValueError(f"{len(sources)} source ids for {n} inputs")
        labels, confs = _labels_confidences(logits)
        core, mid = self.core, self.model_id
        out: list[Result | Ticket] = []
        kick = False
        with self._lock:
            for i in range(n):
                r, flush = core.decide(mid, xs[i], logits[i], labels[i], confs[i], sources[i], t0)
                kick |= flush
                if r.__class__ is Ticket:
                    if loop is None:
                        waiter = r.waiter = _allocate_lock()
                        waiter.acquire()
                        r.wake = waiter.release
                    else:
                        fut = r.waiter = loop.create_future()
                        r.wake = partial(loop.call_soon_threadsafe, _wake_future, fut)
                out.append(r)
        if kick:
            self.transport.kick()
        return out

    def _finish(self, res: Result, t0: float) -> Result:
        now = perf_counter()
        latency = now - t0
        res.latency_s = latency
        if res.stages is not None:  # the controller decided: close its `after` stage
            res.stages.finish(now)
        self._observe(latency)
        return res

    def _one(self, x: Any) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self._dtype)
        if self.input_shape is None:
            self._bind(x.shape)
            self._check_bound()
        if x.shape != self.input_shape:
            if x.shape[1:] == self.input_shape and x.shape[0] == 1:
                return x[0]
            raise ValueError(f"input of shape {x.shape}, model takes {self.input_shape}")
        return x

    def _many(self, xs: Any) -> np.ndarray:
        xs = np.ascontiguousarray(xs, dtype=self._dtype)
        if self.input_shape is None and xs.ndim > 1:
            self._bind(xs.shape[1:])
            self._check_bound()
        if xs.shape[1:] != self.input_shape:
            raise ValueError(f"batch of shape {xs.shape}, want [N, *{self.input_shape}]")
        return xs

    def _check_bound(self) -> None:
        if self.core is None:
            raise RuntimeError("guard is closed")

    # ---- session and lifecycle -----------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the controller session is up (MAIN: resync acknowledged)."""
        return self.up.is_set()

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Block until the session is up; False when ``timeout_s`` passed first (at
        once for a model whose input shape is not known before its first call)."""
        if self.core is None:
            return False
        return self.up.wait(timeout_s)

    def local_mod(self, mod: pb.VigilanceMod | pb.TableMod) -> None:
        """Apply a rule or RT change locally (standalone use, tests, benchmarks). The
        controller's resync replaces local rules when a session comes up."""
        if self.core is None:
            raise RuntimeError("the model's input shape is not known yet (no call so far)")
        with self._lock:
            if isinstance(mod, pb.VigilanceMod):
                self.core.rules.apply(mod, perf_counter())
            else:
                self.core.apply_table_mod(mod, perf_counter())

    def stats(self) -> pb.AgentStats:
        if self.core is None:
            return pb.AgentStats()
        with self._lock:
            return self.core.agent_stats(perf_counter())

    def close(self) -> None:
        """End the session and the I/O thread; waiting callers get the fail mode.
        Idempotent."""
        if self._closed:
            return
        with self._bind_lock:
            self._closed = True
        if self.transport is not None:
            self.transport.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_agent_id(config: AgentConfig) -> AgentConfig:
    """``config`` with its agent id final, the one place it is decided.

    With TLS: the name of the agent certificate (``tls_cert``), whose files are read and
    checked here (ConfigError naming the ``tls_*`` setting, or an ``agent_id`` that
    differs from the certificate). With ``plaintext``: ``agent_id``, or
    ``<host>-<pid>-<model_id>`` when empty, and one WARNING that the session is
    unauthenticated plain text.
    """
    files = config.tls_files()
    if files is not None:
        agent_id = config.certified_agent_id(files)
    else:
        log.warning(
            "controller %s: plain text, unauthenticated and unencrypted (plaintext=True)",
            config.controller,
        )
        agent_id = config.agent_id or f"{socket.gethostname()}-{os.getpid()}-{config.model_id}"
    return config if agent_id == config.agent_id else config.replace(agent_id=agent_id)


def attach(
    model: Any,
    config: AgentConfig | None = None,
    /,
    *,
    on_retraction: Callable[[Result], object] | None = None,
    registry: CollectorRegistry | None = None,
    model_executor: Executor | None = None,
    **overrides: Any,
) -> Guard:
    """Put ``model`` behind the controller at ``config.controller`` (``host:port``).

    ``model``: a torch.nn.Module, a TorchScript (.pt) or ONNX (.onnx) file, or a
    callable on numpy batches returning logits ``[N, C]``. ``config`` (default: the
    :class:`AgentConfig` defaults) with ``overrides`` (AgentConfig fields, e.g.
    ``attach(model, controller="127.0.0.1:6653", model_id="m", input_shape=(1, 28, 28))``)
    says everything else; a bad or unknown one raises :class:`ConfigError` before
    anything starts. ``input_shape`` is one input without the batch dimension; when
    neither it nor the model file gives it, the first call does, and the session starts
    then. ``budget_us`` and ``fail_mode`` make the table-miss rule in force until the
    controller installs its own. With ``connect_timeout_s`` wait that long for the
    session (``guard.connected`` tells whether it came up). The session uses mTLS with
    ``tls_ca``/``tls_cert``/``tls_key`` (the agent id is the certificate's name), or
    plain text with ``plaintext=True`` to a loopback or unix:// controller only.

    Not configuration: ``on_retraction`` (called with a Result the controller took
    back), ``registry`` (a Prometheus registry to fill, shared by several guards) and
    ``model_executor`` (where the asyncio API runs the model).
    """
    if config is not None and not isinstance(config, AgentConfig):
        raise ConfigError(
            f"config: an AgentConfig, got {config!r} (pass controller=..., model_id=... "
            "as keywords)"
        )
    config = resolve_agent_id(AgentConfig.from_overrides(config, **overrides))
    adapter = wrap_model(model, input_shape=config.input_shape, input_dtype=config.input_dtype)

    def make_core(shape: tuple[int, ...]) -> AgentCore:
        try:  # warms up, and says at once what the model makes of this shape
            probe = adapter.predict(np.zeros((1, *shape), dtype=adapter.input_dtype))
        except Exception as exc:  # the model's own error, whatever it raises
            raise ConfigError(
                f"input_shape: the model refuses an input of shape {tuple(shape)}"
                f" ({type(exc).__name__}: {one_line(exc)}); set input_shape to what it takes"
            ) from None
        if probe.ndim != 2:
            raise ConfigError(
                f"the model gives outputs of shape {probe.shape[1:]} for one input; the agent"
                " needs one logit per class"
            )
        n_classes = probe.shape[1]
        names = config.class_names or tuple(str(i) for i in range(n_classes))
        if len(names) != n_classes:
            raise ConfigError(
                f"class_names: {len(names)} names for {n_classes} logits, got {names!r}"
            )
        acts, shapes = None, ()
        if config.activations:
            try:
                acts = adapter.activations_fn(config.activations)
                got = acts(np.zeros((1, *shape), dtype=adapter.input_dtype))
            except ValueError as exc:
                raise ConfigError(one_line(exc)) from None
            shapes = tuple(tuple(int(d) for d in got[n].shape[1:]) for n in config.activations)
            log.info(
                "activations this agent can send (when the controller asks): %s",
                ", ".join(f"{n} {s}" for n, s in zip(config.activations, shapes, strict=True)),
            )
        info = ModelInfo(
            model_id=config.model_id,
            input_shape=tuple(shape),
            class_names=names,
            input_dtype=adapter.input_dtype,
            framework=adapter.framework,
            model_digest=adapter.digest,
            privacy=config.privacy,
            activation_names=config.activations,
            activations=acts,
            activations_dtype=np.dtype(config.activations_dtype),
            activation_shapes=shapes,
        )
        if info.privacy is not None and info.privacy.on and info.privacy.logits == "raw":
            log.warning(
                "privacy %s: the logits go up raw, so no epsilon covers what is sent (use"
                " logits=label or logits=noised:EPS)",
                info.privacy,
            )
        if config.near_copy_radius and perceptual.KERNEL != "compiled":
            log.warning(
                "near-copy matching runs on numpy (~10 us per input of a label with known"
                " attacks, not ~2): openexample's compiled kernel was not built (install"
                " with a C compiler: pip install -e .)"
            )
        return AgentCore(config.agent_id, [info], config, now=perf_counter())

    guard = Guard(
        adapter,
        make_core,
        config,
        on_retraction=on_retraction,
        registry=registry,
        model_executor=model_executor,
    )
    timeout_s = config.connect_timeout_s
    if timeout_s is not None and not guard.wait_connected(timeout_s):
        log.warning("no session with controller %s after %.1f s", config.controller, timeout_s)
    return guard
