"""One agent's configuration: every default of the data plane, once.

``attach(model, config, **overrides)`` and ``openexample-agent attach`` build an
:class:`AgentConfig`; the core, the transport and the guard read it and keep no
defaults of their own. Every value is checked when the object is made (directly, by
:meth:`AgentConfig.replace` or by :meth:`AgentConfig.from_overrides`); a bad one
raises :class:`~openexample.errors.ConfigError` naming the field and the value
(``budget_us: must be > 0, got -5``). Sequences become tuples, ints given for floats
become floats, and a ``privacy`` string is parsed against the same config's
``input_range``. The ``tls_*`` files are only read when a channel is made
(:meth:`AgentConfig.tls_files`, at attach), so ``AgentConfig()`` needs no files.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.privacy import PrivacyNoise
from openexample.addresses import parse_address, parse_addresses
from openexample.errors import ConfigError
from openexample.identity import Kind
from openexample.limits import DEFAULT_LIMITS, MAX_ID_BYTES, MAX_TENSOR_DIMS, Limits
from openexample.perceptual import MAX_RADIUS
from openexample.rules import MAX_BUDGET_US
from openexample.tls import TlsFiles, check_plaintext, is_loopback

FAIL_MODES = ("standalone", "secure")


@dataclass(frozen=True)
class AgentConfig:
    # Where the controller is (HOST:PORT or grpc://HOST:PORT for gRPC; tcp://HOST:PORT or
    # unix:///PATH for the native channel), and who we are to it. Several, separated by
    # commas, for failover: one session at a time, with the first that answers; when it
    # is lost, the next one at once (calls in flight get the fail mode meanwhile).
    controller: str = "127.0.0.1:6653"
    model_id: str = "model"
    # "" = the name in tls_cert (agent/<name>) with TLS, else <host>-<pid>-<model_id>.
    # With TLS a different agent_id is refused: the controller only takes the name the
    # certificate proves.
    agent_id: str = ""
    # mTLS with the controller (PEM paths): the CA that signs the controller, and this
    # agent's certificate and key (identity agent/<agent_id>). Read when the channel is
    # made (attach), not here. `openexample-pki init DIR --agent NAME` makes a set.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Plain text instead: no encryption, no authentication. Only when asked for, and only
    # to a loopback or unix:// controller.
    plaintext: bool = False
    # The name to verify in the controller's certificate ("" = the host of `controller`,
    # "localhost" for unix://).
    tls_server_name: str = ""
    # The model's input (one sample, no batch dimension); None = from the model file or
    # the first call.
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None  # None = what the model takes (float32 by default)
    class_names: tuple[str, ...] = ()  # () = "0", "1", ...
    input_range: tuple[float, float] = (0.0, 1.0)
    # The table-miss rule in force until the controller installs its own.
    budget_us: int = 10_000  # as the controller's default (controller/config.py says why)
    fail_mode: str = "standalone"
    # Local differential-privacy noise on what is sent (openexample/privacy.py); None =
    # off. Off by default: the controller's detectors must be calibrated for the same
    # noise (`openexample-controller train --privacy SPEC`, else this agent is refused),
    # and a useful guarantee costs detection (README "Privacy noise"). A spec string
    # ("gaussian:EPS[:DELTA][,clip=C][,centre=V][,logits=raw|label|noised:EPS]",
    # "laplace:EPS[,...]", "none[,logits=label]") becomes a PrivacyNoise over input_range.
    privacy: PrivacyNoise | str | None = None
    # Intermediate activations this agent can send (PKG_IN.activations) for the
    # controller's feature-map detectors: the model's layer names (module paths,
    # "features.2"; for ONNX also tensor names); () = none. Declared in FEATURES with
    # shape and dtype; sent only those the controller asks for (FEATURES_REQUEST), only
    # with items that go up (one more forward pass up to the layers), never for calls
    # decided here. torch, TorchScript and ONNX models (ONNX needs the onnx package).
    activations: tuple[str, ...] = ()
    activations_dtype: str = "float16"  # on the wire: float16 (half the bytes) or float32
    # PKG_IN batching: wait this long for more items (0 = send at once), at most this many.
    batch_window_us: int = 0
    max_batch_items: int = 64
    # Tables.
    max_rules: int = 4096
    rt_max_entries: int = 100_000
    rt_ttl_s: float = 0.0  # 0 = until evicted
    # Refuse near-copies of known attacks from the RT: inputs of the same model and label
    # whose perceptual key is within this many bits of an ADVERSARIAL entry's
    # (openexample/perceptual.py); 0 = exact fingerprints only.
    near_copy_radius: int = 4
    ft_max_entries: int = 10_000
    ft_max_age_s: float = 1.0
    # A verdict later than this after its PKG_IN is dropped (no retraction any more).
    late_window_s: float = 5.0
    # Session liveness.
    echo_interval_s: float = 1.0
    echo_unreplied_limit: int = 3
    handshake_timeout_s: float = 10.0
    # Reconnects: exponential backoff with jitter.
    backoff_initial_s: float = 0.05
    backoff_cap_s: float = 2.0
    connect_timeout_s: float | None = None  # attach() waits this long for the session
    # Prometheus: None = no HTTP endpoint (the registry is still filled).
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    # Serve metrics over TLS with the agent's certificate, scrapers authenticated by the
    # CA (required for any non-loopback metrics_addr).
    metrics_tls: bool = False
    # Keyed fingerprints for RT/FT (b"" = plain BLAKE2b).
    fingerprint_key: bytes = b""
    limits: Limits = DEFAULT_LIMITS
    seed: int | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> AgentConfig:
        """A checked copy with ``changes``; an unknown key is a ConfigError."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown agent setting (valid: {', '.join(field_names())})"
            )
        privacy = self.privacy
        if (
            "input_range" in changes
            and "privacy" not in changes
            and isinstance(privacy, PrivacyNoise)
            and privacy.input_range == self.input_range
            and privacy.clip is None
            and privacy.centre is None
        ):
            # Noise whose clip and centre follow the range (the defaults): move it along.
            changes["privacy"] = _recalibrated(privacy, changes["input_range"])
        return dataclasses.replace(self, **changes)

    @property
    def controllers(self) -> tuple[str, ...]:
        """The controller addresses, in the order failover tries them."""
        return tuple(a.strip() for a in self.controller.split(",") if a.strip())

    def tls_files(self) -> TlsFiles | None:
        """The TLS files to reach the controller with (None with ``plaintext``);
        ConfigError naming the first ``tls_*`` setting that is missing, unreadable or
        expired."""
        if self.plaintext:
            return None
        try:
            return TlsFiles.from_settings(self.tls_ca, self.tls_cert, self.tls_key)
        except ConfigError as exc:
            if "required" not in str(exc):
                raise
            raise ConfigError(f"{exc} [agents: plaintext=True, or --plaintext]") from None

    def certified_agent_id(self, files: TlsFiles) -> str:
        """The agent id ``files`` prove (the name of ``agent/<name>`` in tls_cert);
        ConfigError when the certificate is no agent's, or ``agent_id`` says another."""
        try:
            ident = files.identity()
        except ValueError as exc:
            raise ConfigError(f"tls_cert: {files.cert}: not a PEM certificate ({exc})") from None
        if ident is None:
            raise ConfigError(
                f"tls_cert: {files.cert} carries no spiffe://openexample/agent/NAME identity"
            )
        if ident.kind is not Kind.AGENT:
            raise ConfigError(f"tls_cert: identity {ident} is not an agent")
        if self.agent_id and self.agent_id != ident.name:
            raise ConfigError(
                f"agent_id: {self.agent_id!r}, but tls_cert proves {ident}; the controller"
                f" only accepts {ident.name!r} (leave agent_id empty)"
            )
        return ident.name

    @classmethod
    def from_overrides(cls, base: AgentConfig | None = None, **overrides: Any) -> AgentConfig:
        """``base`` (or the defaults) with ``overrides`` applied, all checked."""
        if base is None:
            base = cls()
        elif not isinstance(base, AgentConfig):
            raise ConfigError(f"config: an AgentConfig, got {base!r}")
        return base.replace(**overrides) if overrides else base


def field_names() -> tuple[str, ...]:
    """The AgentConfig fields, in declaration order (the valid override keys)."""
    return _FIELD_NAMES


def _recalibrated(privacy: PrivacyNoise, input_range: Any) -> PrivacyNoise | Any:
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        return privacy  # the input_range check names the bad value
    if not lo < hi:
        return privacy
    return dataclasses.replace(privacy, input_range=(lo, hi))


# ---- checks ----------------------------------------------------------------------------


def _set(cfg: AgentConfig, key: str, value: Any) -> None:
    object.__setattr__(cfg, key, value)


def _int(cfg: AgentConfig, key: str, *, lo: int, hi: int | None = None, none: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and none:
        return
    if isinstance(value, bool | float | str):
        raise ConfigError(f"{key}: an integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ConfigError(f"{key}: an integer, got {value!r}") from None
    if n < lo:
        raise ConfigError(f"{key}: must be {'> 0' if lo == 1 else f'>= {lo}'}, got {n}")
    if hi is not None and n > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {n}")
    _set(cfg, key, n)


def _float(cfg: AgentConfig, key: str, *, positive: bool, none: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{key}: a number of seconds, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or (x <= 0 if positive else x < 0):
        raise ConfigError(f"{key}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    _set(cfg, key, x)


def _str(cfg: AgentConfig, key: str, *, empty: bool) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: a string, got {value!r}")
    if not value and not empty:
        raise ConfigError(f"{key}: must not be empty")
    if len(value.encode()) > MAX_ID_BYTES:
        raise ConfigError(f"{key}: at most {MAX_ID_BYTES} bytes, got {len(value.encode())}")


def _path(cfg: AgentConfig, key: str) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: a file path (str), got {value!r}")


def _validate(cfg: AgentConfig) -> None:
    # HOST:PORT, tcp://, unix://; several separated by commas
    controllers = parse_addresses(cfg.controller, "controller")
    _str(cfg, "model_id", empty=False)
    _str(cfg, "agent_id", empty=True)
    for key in ("tls_ca", "tls_cert", "tls_key"):
        _path(cfg, key)
    if not isinstance(cfg.plaintext, bool):
        raise ConfigError(f"plaintext: True or False, got {cfg.plaintext!r}")
    if cfg.plaintext:
        for i, address in enumerate(controllers):
            check_plaintext(address, "controller" if len(controllers) == 1 else f"controller[{i}]")
    _str(cfg, "tls_server_name", empty=True)

    shape = cfg.input_shape
    if shape is not None:
        bad = ConfigError(f"input_shape: positive ints, got {shape!r}")
        if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__"):
            raise bad
        dims = tuple(shape)
        if not dims or any(isinstance(d, bool | float) for d in dims):
            raise bad
        try:
            dims = tuple(operator.index(d) for d in dims)
        except TypeError:
            raise bad from None
        if any(d <= 0 for d in dims):
            raise bad
        if len(dims) >= MAX_TENSOR_DIMS:
            raise ConfigError(
                f"input_shape: at most {MAX_TENSOR_DIMS - 1} dimensions, got {shape!r}"
            )
        _set(cfg, "input_shape", dims)

    if cfg.input_dtype is not None:
        try:
            dt = np.dtype(cfg.input_dtype)
        except TypeError:
            raise ConfigError(f"input_dtype: a numpy dtype, got {cfg.input_dtype!r}") from None
        _set(cfg, "input_dtype", dt.name)

    names = cfg.class_names
    if names is None:
        names = ()
    if isinstance(names, str | bytes) or not hasattr(names, "__iter__"):
        raise ConfigError(f"class_names: a sequence of strings, got {cfg.class_names!r}")
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"class_names: non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"class_names: must be distinct, got {names!r}")
    _set(cfg, "class_names", names)

    acts = cfg.activations
    if isinstance(acts, str):
        acts = tuple(a.strip() for a in acts.split(",") if a.strip())
    if acts is None or not hasattr(acts, "__iter__"):
        raise ConfigError(f"activations: a sequence of layer names, got {cfg.activations!r}")
    acts = tuple(acts)
    if not all(isinstance(a, str) and a for a in acts) or len(set(acts)) != len(acts):
        raise ConfigError(f"activations: distinct non-empty layer names, got {acts!r}")
    _set(cfg, "activations", acts)
    if cfg.activations_dtype not in ("float16", "float32"):
        raise ConfigError(f"activations_dtype: float16 or float32, got {cfg.activations_dtype!r}")

    rng = cfg.input_range
    try:
        lo, hi = (float(v) for v in rng)
    except (TypeError, ValueError):
        raise ConfigError(f"input_range: (lo, hi), got {rng!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"input_range: finite lo < hi, got {rng!r}")
    _set(cfg, "input_range", (lo, hi))

    _int(cfg, "budget_us", lo=1, hi=MAX_BUDGET_US)
    mode = cfg.fail_mode
    key = mode.strip().lower().removeprefix("fail_mode_") if isinstance(mode, str) else None
    if key not in FAIL_MODES:
        raise ConfigError(f"fail_mode: 'standalone' or 'secure', got {mode!r}")
    _set(cfg, "fail_mode", key)

    privacy = cfg.privacy
    if isinstance(privacy, str):
        try:
            privacy = PrivacyNoise.parse(privacy, cfg.input_range)
        except ValueError as exc:
            raise ConfigError(f"privacy: {exc}") from None
        _set(cfg, "privacy", privacy)
    elif privacy is not None and not isinstance(privacy, PrivacyNoise):
        raise ConfigError(
            f"privacy: None, a PrivacyNoise or a spec like 'gaussian:EPS', got {privacy!r}"
        )
    elif privacy is not None and privacy.input_range != cfg.input_range:
        raise ConfigError(
            f"privacy: noise for inputs in {privacy.input_range}, but input_range is"
            f" {cfg.input_range}: give both the same range"
        )
    if cfg.activations and isinstance(cfg.privacy, PrivacyNoise) and cfg.privacy.on:
        raise ConfigError(
            "activations: not with privacy noise (they would carry the raw input's features"
            " past the noise); set one of them"
        )

    _int(cfg, "batch_window_us", lo=0)
    _int(cfg, "max_batch_items", lo=1)
    _int(cfg, "max_rules", lo=1)
    _int(cfg, "rt_max_entries", lo=1)
    _float(cfg, "rt_ttl_s", positive=False)
    _int(cfg, "near_copy_radius", lo=0, hi=MAX_RADIUS)
    _int(cfg, "ft_max_entries", lo=1)
    _float(cfg, "ft_max_age_s", positive=True)
    _float(cfg, "late_window_s", positive=True)
    _float(cfg, "echo_interval_s", positive=True)
    _int(cfg, "echo_unreplied_limit", lo=1)
    _float(cfg, "handshake_timeout_s", positive=True)
    _float(cfg, "backoff_initial_s", positive=True)
    _float(cfg, "backoff_cap_s", positive=True)
    if cfg.backoff_cap_s < cfg.backoff_initial_s:
        raise ConfigError(
            f"backoff_cap_s: must be >= backoff_initial_s ({cfg.backoff_initial_s}), "
            f"got {cfg.backoff_cap_s}"
        )
    _float(cfg, "connect_timeout_s", positive=False, none=True)
    _int(cfg, "metrics_port", lo=0, hi=65535, none=True)
    _str(cfg, "metrics_addr", empty=False)
    if not isinstance(cfg.metrics_tls, bool):
        raise ConfigError(f"metrics_tls: True or False, got {cfg.metrics_tls!r}")
    host = cfg.metrics_addr
    where = parse_address(f"[{host}]:0" if ":" in host else f"{host}:0", "metrics_addr")
    if cfg.metrics_port is not None and not cfg.metrics_tls and not is_loopback(where):
        raise ConfigError(
            f"metrics_addr: {host} is not loopback: set metrics_tls=True (scrapers then"
            " need a certificate from the CA)"
        )

    fkey = cfg.fingerprint_key
    if isinstance(fkey, bytearray | memoryview):
        fkey = bytes(fkey)
    if not isinstance(fkey, bytes):
        raise ConfigError(f"fingerprint_key: bytes, got {type(fkey).__name__}")
    if len(fkey) > 64:  # BLAKE2b's key size
        raise ConfigError(f"fingerprint_key: at most 64 bytes, got {len(fkey)}")
    _set(cfg, "fingerprint_key", fkey)

    if not isinstance(cfg.limits, Limits):
        raise ConfigError(f"limits: an openexample.limits.Limits, got {cfg.limits!r}")
    _int(cfg, "seed", lo=0, none=True)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AgentConfig))
