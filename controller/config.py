"""Controller configuration: a YAML or TOML file, then command-line overrides.

Every key is checked; an unknown key or a bad value raises :class:`ConfigError`
naming it (``detection.models.mnist.fpr: must be in (0, 1), got 2``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.correction import POLICIES
from controller.tracing import TraceParams
from openexample import rules as vrules
from openexample.addresses import Address, parse_address, parse_addresses
from openexample.errors import ConfigError, ProtocolError  # ConfigError: also from here
from openexample.identity import Kind, valid_name
from openexample.tls import TlsFiles, check_plaintext, is_loopback
from openexample.v1 import openexample_pb2 as pb

ACTIVATION_SOURCES = ("auto", "agent", "reference")  # ModelConfig.activations


@dataclass(frozen=True)
class ModelConfig:
    """Detectors for one model id (artifact folders made by ``train``)."""

    detectors: tuple[str, ...] = ()
    # Target false-positive rate of the fused verdict on clean inputs; split across
    # detectors (OR of per-detector thresholds).
    fpr: float = 0.01
    # Optional TorchScript / ONNX reference copy, for detectors that call the model.
    reference_model: str = ""
    # ADVERSARIAL verdicts: "drop" (withhold) or "correct" (hand out the corrected label
    # when at least correct_min_agree purifying detectors agree on it; controller/correction.py)
    on_adversarial: str = "drop"
    correct_min_agree: int = 2
    # k of n (several controllers): a verdict needs this many controllers (this one
    # included) to agree; every other controller up on the bus is asked (controller/
    # consensus.py). 1: this controller alone.
    consensus: int = 1
    # Where detectors that read layer activations (featuremap) get them: "auto" asks
    # agents for them (FEATURES_REQUEST) and computes them from the reference copy for an
    # agent that does not declare them with the right shape; "agent" asks and refuses
    # such an agent (HELLO_FAILED/INCOMPATIBLE); "reference" never asks, always computes.
    activations: str = "auto"


@dataclass(frozen=True)
class ClusterConfig:
    """The east-west bus between controllers (controller/bus.py, controller/cluster.py):
    MQTT 5 on a broker every controller of the deployment reaches.

    ``broker``: ``mqtts://HOST[:PORT]`` (TLS, default port 8883: the controller's
    ``tls_ca``/``tls_cert``/``tls_key`` authenticate it to the broker, whose certificate
    must name a ``broker/*`` identity from the same CA), or ``mqtt://HOST[:PORT]`` (plain
    text, default 1883; loopback only, like every listener). The controller's identity on
    the bus is its certificate's (``controller/<name>``), or ``controller/<controller_id>``
    in plain text.
    """

    broker: str = ""
    # MQTT keepalive: a broker that dies without closing the socket is noticed in ~1.5x.
    keepalive_s: int = 5
    # Reconnect backoff after the broker went away: doubles from the min to the max.
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 5.0
    # The retained W/W0/service-time message, at most this often (and on change).
    workload_interval_s: float = 1.0
    # The retained snapshot of the replicated state, after changes, at most this often.
    snapshot_interval_s: float = 2.0
    # Work over W0 goes to a neighbour (controller/overflow.py) instead of being answered
    # UNKNOWN/OVERLOADED at once; this controller also takes its neighbours' work.
    overflow: bool = True
    # Mastership (controller/mastership.py): the agent group this controller serves (the
    # controllers its agents fail over among); in it one MASTER takes operator changes.
    group: str = "default"
    # auto: stands for election (MASTER or SLAVE); equal: never (serves verdicts only).
    role: str = "auto"
    # Among live candidates with no master, the highest priority claims the mastership.
    priority: int = 100
    # A peer's role message is good this long; a master cut off from the bus for this
    # long steps down.
    lease_s: float = 6.0
    # The agent group's controllers (["controller/ctl-a", ...]): only they take part in
    # its election and only their rules are adopted; a role or rules message naming the
    # group from any other identity is refused. Empty: any controller on the bus that
    # names the group (every controller certificate of the deployment is trusted).
    members: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return self.broker.startswith("mqtts://")

    @property
    def host_port(self) -> tuple[str, int]:
        """The broker's host and port (the scheme's default port when none is given)."""
        return _broker_address(self.broker)


def _broker_address(url: str) -> tuple[str, int]:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts") or not rest or "/" in rest:
        raise ConfigError(
            f"cluster.broker: mqtts://HOST[:PORT] (or mqtt:// for plain text on loopback),"
            f" got {url!r}"
        )
    default = 8883 if scheme == "mqtts" else 1883
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port_text = tail.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise ConfigError(f"cluster.broker: bad host or port in {url!r}")
    return host, port


def _cluster_config(raw: Any) -> ClusterConfig:
    _check_type("cluster", raw, dict)
    known = [f.name for f in dataclasses.fields(ClusterConfig)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"cluster.{key}: unknown key (known: {', '.join(known)})")
    if "broker" not in raw:
        raise ConfigError("cluster.broker: required (mqtts://HOST:PORT)")
    changes: dict[str, Any] = {}
    base = ClusterConfig()
    for key, value in raw.items():
        default = getattr(base, key)
        if key == "members":
            _check_type("cluster.members", value, list)
            changes[key] = tuple(_check_type("cluster.members[]", v, str) for v in value)
            continue
        want: type | tuple[type, ...] = (
            (int, float) if isinstance(default, float) else type(default)
        )
        changes[key] = _check_type(f"cluster.{key}", value, want)
        if isinstance(default, float):
            changes[key] = float(value)
    return ClusterConfig(**changes)


def _check_cluster(cfg: Config) -> None:
    c = cfg.cluster
    if c is None:
        for model_id, m in cfg.models.items():
            if m.consensus > 1:
                raise ConfigError(
                    f"models.{model_id}.consensus: {m.consensus} controllers must agree, but"
                    " there is no cluster section (add one, or consensus: 1)"
                )
        return
    host, port = c.host_port
    if not c.tls:
        address = parse_address(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "cluster.broker"
        )
        if not is_loopback(address):
            raise ConfigError(
                f"cluster.broker: plaintext only on loopback, got {c.broker}; use mqtts://"
            )
    elif cfg.plaintext:
        raise ConfigError(
            "cluster.broker: mqtts:// needs the controller's certificate (plaintext is on);"
            " use mqtt:// on loopback"
        )
    keys = ("keepalive_s", "reconnect_min_s", "workload_interval_s", "snapshot_interval_s")
    for key in (*keys, "lease_s"):
        if not getattr(c, key) > 0:
            raise ConfigError(f"cluster.{key}: must be > 0, got {getattr(c, key)!r}")
    if c.reconnect_max_s < c.reconnect_min_s:
        raise ConfigError(
            f"cluster.reconnect_max_s: must be >= reconnect_min_s, got {c.reconnect_max_s!r}"
        )
    if not valid_name(c.group):
        raise ConfigError(f"cluster.group: letters, digits, . _ - only, got {c.group!r}")
    if c.role not in ("auto", "equal"):
        raise ConfigError(f"cluster.role: auto or equal, got {c.role!r}")
    if not 0 <= c.priority < 1 << 32:
        raise ConfigError(f"cluster.priority: 0 .. 2^32-1, got {c.priority!r}")
    for member in c.members:
        kind, _, name = member.partition("/")
        if kind != "controller" or not valid_name(name):
            raise ConfigError(f"cluster.members: controller/<name> identities, got {member!r}")
    if c.members and cfg.cluster_identity() not in c.members:
        raise ConfigError(
            f"cluster.members: lists the group's controllers, but not this one"
            f" ({cfg.cluster_identity()})"
        )


_RULE_KEYS = ("match", "priority", "actions", "agent", "model", "send_removed")


@dataclass(frozen=True)
class RuleConfig:
    """One rule as code (an entry of the config's ``rules``), in the CLI's syntax.

    The controller keeps it as desired state from the start, for all agents, for one
    ``agent``, or for the agents serving a ``model`` (as ``rules add --agent`` /
    ``--for-model``), and a SIGHUP reloads the list. Config rules never time out.
    """

    index: int  # its place in the file's list: messages name it ``rules[index]``
    actions: tuple[str, ...]  # ``drop``, ``inspect:400000:secure``, ...
    match: str = ""  # ``model=mnist-cnn,source=plc-9`` ("" matches everything)
    priority: int = vrules.DEFAULT_PRIORITY
    agent: str = ""  # only this agent
    model: str = ""  # only agents that serve this model
    send_removed: bool = False

    @property
    def where(self) -> str:
        return f"rules[{self.index}]"

    @property
    def scope(self) -> tuple[str, str]:
        """("agent", ID), ("model", ID) or ("all", "")."""
        if self.agent:
            return ("agent", self.agent)
        if self.model:
            return ("model", self.model)
        return ("all", "")

    def describe(self) -> str:
        """One line for logs: where, priority, match, actions and scope."""
        kind, who = self.scope
        scope = {"agent": f"agent {who}", "model": f"agents of model {who}"}.get(kind, "all")
        return (
            f"{self.where} prio={self.priority} match={self.match or '*'}"
            f" actions={','.join(self.actions)} for {scope}"
        )

    def to_mod(self, default_budget_us: int, cookie: int = 0) -> pb.VigilanceMod:
        """The ADD (ValueError or ProtocolError if the entry is bad: see :func:`validate`)."""
        return vrules.vigilance_mod(
            vrules.ADD,
            match=vrules.parse_match(self.match),
            priority=self.priority,
            actions=[vrules.parse_action(a, default_budget_us) for a in self.actions],
            cookie=cookie,
            flags=vrules.SEND_REMOVED if self.send_removed else 0,
        )


@dataclass(frozen=True)
class Config:
    controller_id: str = "controller-1"
    # Where agents connect: one address, or a list (YAML list, or commas). Exactly one
    # gRPC address (HOST:PORT or grpc://HOST:PORT; the admin API, health and reflection
    # live there), plus any native ones: tcp://HOST:PORT, unix:///PATH.
    listen: str | tuple[str, ...] = "127.0.0.1:6653"
    # TLS on every listener, peers authenticated by certificate (mTLS): the CA that signs
    # agents and operators, and this controller's certificate and key (PEM; relative
    # paths are read from the config file's folder). `openexample-pki init DIR` makes a
    # development set.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Plain text instead, with no authentication: only when asked for, only on
    # loopback or Unix sockets, and loudly logged.
    plaintext: bool = False
    # 0 picks a free port (logged); -1 disables the metrics endpoint.
    metrics_port: int = 9464
    metrics_addr: str = "127.0.0.1"
    # Serve metrics over TLS with the controller's certificate, scrapers authenticated by
    # the CA (required for any non-loopback metrics_addr).
    metrics_tls: bool = False
    # Default table-miss rule installed on every agent.
    # 10 ms: what the default set-up (gRPC, DeSVig + margin, one to four agents) meets at
    # p99 on a 2-core machine (measured p99 2.7 ms with one agent, 7.3 ms with four; the
    # native channel: 1.7 / 5.4 ms). The paper's 350 us is one line away: budget_us: 350.
    budget_us: int = 10_000
    fail_mode: str = "standalone"
    # Liveness: ECHO every interval; this many unanswered -> session dead.
    echo_interval_s: float = 1.0
    echo_unreplied_limit: int = 3
    # An agent that has not finished HELLO, FEATURES and the resync BARRIER by then is
    # closed (liveness only starts once the handshake is done).
    handshake_timeout_s: float = 10.0
    # Workload W0 (seed 000, Table III): items queued or being scored; above it new
    # PKG_IN items are answered UNKNOWN/OVERLOADED at once.
    max_workload: int = 4096
    # Per agent: items admitted and not answered, and a rate (items/s, 0 = no limit) with
    # a burst; beyond either the PKG_IN is answered UNKNOWN/OVERLOADED at once.
    max_in_flight_per_agent: int = 1024
    max_rate_per_agent: float = 0.0
    rate_burst: int = 1024
    # Bytes waiting to be sent to one peer; a peer that lets more pile up (it does not
    # read) gets ERROR BAD_REQUEST/NOT_READING and the stream closes.
    max_outbox_bytes: int = 64 * 1024 * 1024
    max_batch_items: int = 256
    # Swift vigilance: ADVERSARIAL verdicts are pushed as RT entries to all agents
    # of the model, valid this long (0 = until evicted).
    rt_push: bool = True
    rt_ttl_s: int = 3600
    # The deployment's fingerprint key (hex, as the agents' fingerprint_key): the
    # controller recomputes each flagged input's fingerprint before it enters an RT push.
    fingerprint_key: str = ""
    # Source tracing (Table III step 21, controller/tracing.py): a source (namespaced
    # by its agent) is blocked on that agent when its adversarial rate is significantly
    # above the model's calibrated FPR x trace_fpr_factor (one-sided binomial test at
    # trace_alpha on counts decaying with trace_half_life_s), after at least
    # trace_min_adversarial adversarial verdicts.
    trace_half_life_s: float = 60.0
    trace_alpha: float = 1e-6
    trace_min_adversarial: float = 5.0
    trace_fpr_factor: float = 2.0
    trace_max_sources: int = 100_000
    block_hard_timeout_s: int = 600
    # Incidents and admin changes; the desired rules and blocked sources
    # (controller/store.py) are kept in the same SQLite file.
    journal: str = "openexample-journal.sqlite3"
    # Torch intra-op and numpy BLAS threads for detectors. 1: the event loop is one thread, and
    # spinning OpenMP workers on busy cores cost ~100x at small batches (measured).
    torch_threads: int = 1
    models: dict[str, ModelConfig] = field(default_factory=dict)
    # Rules as code (RuleConfig): desired state from the start, reloaded on SIGHUP.
    rules: tuple[RuleConfig, ...] = ()
    # Several controllers (ClusterConfig): the east-west bus. None: this one runs alone.
    cluster: ClusterConfig | None = None
    # The config file's folder (set by load): relative TLS paths are read from there.
    base_dir: str = ""

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def listeners(self) -> tuple[Address, ...]:
        """``listen`` parsed (ConfigError naming the bad entry)."""
        return parse_addresses(self.listen, "listen")

    @property
    def grpc_listen(self) -> Address:
        """The one gRPC address."""
        return next(a for a in self.listeners if not a.native)

    @property
    def native_listen(self) -> tuple[Address, ...]:
        """The native channel's addresses (tcp://, unix://), maybe none."""
        return tuple(a for a in self.listeners if a.native)

    def tls_files(self) -> TlsFiles | None:
        """The TLS files (None with plaintext); ConfigError naming a missing, unreadable
        or expired one."""
        if self.plaintext:
            return None
        base = Path(self.base_dir) if self.base_dir else None
        return TlsFiles.from_settings(self.tls_ca, self.tls_cert, self.tls_key, base=base)

    @property
    def fingerprint_key_bytes(self) -> bytes:
        return bytes.fromhex(self.fingerprint_key)

    def cluster_identity(self) -> str:
        """Who this controller is on the east-west bus: its certificate's identity
        (``controller/<name>``; ConfigError if the certificate is not a controller's), or
        ``controller/<controller_id>`` in plain text."""
        files = self.tls_files()
        if files is None:
            if not valid_name(self.controller_id):
                raise ConfigError(
                    f"controller_id: letters, digits, . _ - only (it names this controller"
                    f" on the bus), got {self.controller_id!r}"
                )
            return f"controller/{self.controller_id}"
        ident = files.identity()
        if ident is None or ident.kind is not Kind.CONTROLLER:
            raise ConfigError(
                f"tls_cert: {files.cert} names {ident or 'no identity'}, not a controller/*"
                " identity: the bus between controllers needs one"
            )
        return str(ident)


_FAIL_MODES = ("standalone", "secure")


def _check_type(path: str, value: Any, want: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; refuse it where a number is wanted.
    if (
        isinstance(value, bool)
        and want is not bool
        and bool not in (want if isinstance(want, tuple) else (want,))
    ):
        raise ConfigError(f"{path}: expected {_type_name(want)}, got {value!r}")
    if not isinstance(value, want):
        raise ConfigError(f"{path}: expected {_type_name(want)}, got {value!r}")
    return value


def _type_name(want: type | tuple[type, ...]) -> str:
    if isinstance(want, tuple):
        return " or ".join(t.__name__ for t in want)
    return want.__name__


def _model_config(path: str, raw: Any) -> ModelConfig:
    _check_type(path, raw, dict)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
    dets = _check_type(f"{path}.detectors", raw.get("detectors", []), list)
    for i, d in enumerate(dets):
        _check_type(f"{path}.detectors[{i}]", d, str)
    fpr = float(_check_type(f"{path}.fpr", raw.get("fpr", 0.01), (int, float)))
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"{path}.fpr: must be in (0, 1), got {fpr}")
    ref = _check_type(f"{path}.reference_model", raw.get("reference_model", ""), str)
    policy = _check_type(f"{path}.on_adversarial", raw.get("on_adversarial", "drop"), str)
    if policy not in POLICIES:
        raise ConfigError(f"{path}.on_adversarial: one of {', '.join(POLICIES)}, got {policy!r}")
    agree = _check_type(f"{path}.correct_min_agree", raw.get("correct_min_agree", 2), int)
    if agree < 1:
        raise ConfigError(f"{path}.correct_min_agree: must be >= 1, got {agree}")
    k = _check_type(f"{path}.consensus", raw.get("consensus", 1), int)
    if k < 1:
        raise ConfigError(f"{path}.consensus: must be >= 1, got {k}")
    acts = _check_type(f"{path}.activations", raw.get("activations", "auto"), str)
    if acts not in ACTIVATION_SOURCES:
        raise ConfigError(
            f"{path}.activations: one of {', '.join(ACTIVATION_SOURCES)}, got {acts!r}"
        )
    return ModelConfig(
        detectors=tuple(dets),
        fpr=fpr,
        reference_model=ref,
        on_adversarial=policy,
        correct_min_agree=agree,
        consensus=k,
        activations=acts,
    )


def _rule_config(path: str, raw: Any, index: int) -> RuleConfig:
    _check_type(path, raw, dict)
    for key in raw:
        if key in ("idle_timeout", "hard_timeout", "idle_timeout_s", "hard_timeout_s"):
            raise ConfigError(
                f"{path}.{key}: config rules do not time out"
                " (add a temporary rule with `rules add --hard-timeout`)"
            )
        if key not in _RULE_KEYS:
            raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(_RULE_KEYS)})")
    if "actions" not in raw:
        raise ConfigError(f"{path}.actions: required (e.g. [drop] or [inspect:400000:secure])")
    actions = raw["actions"]
    if isinstance(actions, str):
        actions = [actions]
    _check_type(f"{path}.actions", actions, list)
    if not actions:
        raise ConfigError(f"{path}.actions: at least one action")
    for i, a in enumerate(actions):
        _check_type(f"{path}.actions[{i}]", a, str)
    agent = _check_type(f"{path}.agent", raw.get("agent", ""), str)
    model = _check_type(f"{path}.model", raw.get("model", ""), str)
    if agent and model:
        raise ConfigError(f"{path}: agent or model, not both")
    return RuleConfig(
        index=index,
        actions=tuple(actions),
        match=_check_type(f"{path}.match", raw.get("match", ""), str),
        priority=_check_type(f"{path}.priority", raw.get("priority", vrules.DEFAULT_PRIORITY), int),
        agent=agent,
        model=model,
        send_removed=_check_type(f"{path}.send_removed", raw.get("send_removed", False), bool),
    )


def _scopes_overlap(a: RuleConfig, b: RuleConfig) -> bool:
    """Whether one agent can get both (two different agents never do)."""
    return not (a.agent and b.agent and a.agent != b.agent)


def _check_rules(cfg: Config) -> None:
    """Each rule parses and would be accepted by an agent's table; no two rules are
    the same table entry (priority and match) on one agent."""
    seen: dict[tuple[int, vrules.RuleMatch], list[RuleConfig]] = {}
    for r in cfg.rules:
        where = r.where
        try:
            match = vrules.RuleMatch.from_pb(vrules.parse_match(r.match))
        except ValueError as exc:
            raise ConfigError(f"{where}.match: {exc}") from None
        except ProtocolError as exc:
            raise ConfigError(f"{where}.match: {exc.text}") from None
        if not 0 <= r.priority <= vrules.MAX_PRIORITY:
            raise ConfigError(f"{where}.priority: want 0..{vrules.MAX_PRIORITY}, got {r.priority}")
        actions = []
        for i, text in enumerate(r.actions):
            try:
                actions.append(vrules.parse_action(text, cfg.budget_us))
            except ValueError as exc:
                raise ConfigError(f"{where}.actions[{i}]: {exc}") from None
        try:
            vrules.RuleActions.from_pb(actions)
        except ProtocolError as exc:
            raise ConfigError(f"{where}.actions: {exc.text}") from None
        if r.priority == 0 and match.is_wildcard:
            raise ConfigError(
                f"{where}: priority 0 with an empty match is the table-miss rule"
                " (set budget_us and fail_mode for it)"
            )
        for other in seen.get((r.priority, match), []):
            if _scopes_overlap(r, other):
                raise ConfigError(
                    f"{where}: same priority and match as {other.where}, and one agent can"
                    " get both (one table entry per priority and match)"
                )
        seen.setdefault((r.priority, match), []).append(r)


def from_mapping(raw: Any, base: Config | None = None) -> Config:
    """A validated Config from a parsed file (dict)."""
    base = base or Config()
    if raw is None:
        return base
    _check_type("config", raw, dict)
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "base_dir"}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(fields))})")
        if key == "listen":
            if isinstance(value, list):
                for i, entry in enumerate(value):
                    _check_type(f"listen[{i}]", entry, str)
                value = tuple(value)
            else:
                _check_type(key, value, (str, list))
            changes[key] = value
            continue
        if key == "models":
            _check_type("models", value, dict)
            changes[key] = {str(mid): _model_config(f"models.{mid}", m) for mid, m in value.items()}
            continue
        if key == "cluster":
            changes[key] = None if value is None else _cluster_config(value)
            continue
        if key == "rules":
            _check_type("rules", value, list)
            changes[key] = tuple(_rule_config(f"rules[{i}]", r, i) for i, r in enumerate(value))
            continue
        default = getattr(base, key)
        want: type | tuple[type, ...] = (
            (int, float) if isinstance(default, float) else type(default)
        )
        changes[key] = _check_type(key, value, want)
        if isinstance(default, float):
            changes[key] = float(value)
    return validate(dataclasses.replace(base, **changes))


def validate(cfg: Config) -> Config:
    """Range checks shared by files and flags."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {what}, got {getattr(cfg, key)!r}")

    if isinstance(cfg.listen, list):
        cfg = dataclasses.replace(cfg, listen=tuple(cfg.listen))  # frozen: keep it hashable
    listeners = parse_addresses(cfg.listen, "listen")
    n_grpc = sum(not a.native for a in listeners)
    if n_grpc != 1:
        raise ConfigError(
            f"listen: exactly one gRPC address (HOST:PORT or grpc://HOST:PORT: the admin API,"
            f" health and reflection live there), got {n_grpc} in {cfg.listen!r}"
        )
    need(-1 <= cfg.metrics_port < 65536, "metrics_port", "want 0..65535 or -1")
    need(0 < cfg.budget_us <= 60_000_000, "budget_us", "want 1..60000000")
    need(cfg.fail_mode in _FAIL_MODES, "fail_mode", f"want one of {_FAIL_MODES}")
    need(cfg.echo_interval_s > 0, "echo_interval_s", "must be > 0")
    need(cfg.echo_unreplied_limit >= 1, "echo_unreplied_limit", "must be >= 1")
    need(cfg.handshake_timeout_s > 0, "handshake_timeout_s", "must be > 0")
    need(cfg.max_workload >= 1, "max_workload", "must be >= 1")
    need(1 <= cfg.max_batch_items <= 1024, "max_batch_items", "want 1..1024")
    need(cfg.max_in_flight_per_agent >= 1, "max_in_flight_per_agent", "must be >= 1")
    need(cfg.max_rate_per_agent >= 0, "max_rate_per_agent", "must be >= 0 (0 = no limit)")
    need(cfg.rate_burst >= 1, "rate_burst", "must be >= 1")
    need(cfg.max_outbox_bytes >= 1024 * 1024, "max_outbox_bytes", "must be >= 1 MiB")
    need(cfg.rt_ttl_s >= 0, "rt_ttl_s", "must be >= 0")
    if cfg.plaintext:
        for a in listeners:
            check_plaintext(a, "listen")
    host = cfg.metrics_addr
    metrics = parse_address(f"[{host}]:0" if ":" in host else f"{host}:0", "metrics_addr")
    if cfg.metrics_port >= 0 and not cfg.metrics_tls and not is_loopback(metrics):
        raise ConfigError(
            f"metrics_addr: {cfg.metrics_addr} is not loopback: set metrics_tls: true"
            " (scrapers then need a certificate from the CA)"
        )
    need(not (cfg.metrics_tls and cfg.plaintext), "metrics_tls", "needs TLS (plaintext is on)")
    try:
        key = cfg.fingerprint_key_bytes
    except ValueError:
        raise ConfigError("fingerprint_key: hex digits, got a non-hex string") from None
    need(len(key) <= 64, "fingerprint_key", "at most 64 bytes (128 hex digits)")
    trace_params(cfg)
    need(cfg.block_hard_timeout_s >= 0, "block_hard_timeout_s", "must be >= 0")
    need(bool(cfg.controller_id), "controller_id", "must not be empty")
    need(cfg.torch_threads >= 1, "torch_threads", "must be >= 1")
    _check_rules(cfg)
    _check_cluster(cfg)
    return cfg


def trace_params(cfg: Config) -> TraceParams:
    """Source tracing's parameters (TraceParams checks them; :func:`validate` calls this)."""
    return TraceParams(
        half_life_s=cfg.trace_half_life_s,
        alpha=cfg.trace_alpha,
        min_adversarial=cfg.trace_min_adversarial,
        fpr_factor=cfg.trace_fpr_factor,
        max_sources=cfg.trace_max_sources,
    )


def _one_line(exc: Exception) -> str:
    """A parser's error in one line: YAML's own spans several (the line, a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load(path: str | Path | None, base: Config | None = None) -> Config:
    """Read a .yaml/.yml/.toml file (None -> defaults)."""
    if path is None:
        return validate(base or Config())
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "TOML" if p.suffix == ".toml" else "YAML"
        raise ConfigError(f"{p}: not valid {kind}: {_one_line(exc)}") from None
    try:
        base = (base or Config()).replace(base_dir=str(p.resolve().parent))
        return from_mapping(raw, base)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
