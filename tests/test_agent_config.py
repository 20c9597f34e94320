"""AgentConfig: every agent default once, every value checked, and who uses it (attach, CLI)."""

import dataclasses
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agents.config import AgentConfig, field_names
from agents.privacy import PrivacyNoise
from openexample.errors import ConfigError, OpenExampleError, ProtocolError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget_us": -5}, "budget_us: must be > 0, got -5"),
        ({"budget_us": 0}, "budget_us: must be > 0, got 0"),
        ({"budget_us": 60_000_001}, "budget_us: must be <= 60000000"),
        ({"budget_us": 1.5}, "budget_us: an integer, got 1.5"),
        ({"budget_us": True}, "budget_us: an integer, got True"),
        ({"fail_mode": "x"}, "fail_mode: 'standalone' or 'secure', got 'x'"),
        ({"controller": "localhost"}, "controller: HOST:PORT, got 'localhost'"),
        ({"controller": "h:99999"}, "controller: HOST:PORT, got 'h:99999'"),
        ({"model_id": ""}, "model_id: must not be empty"),
        ({"agent_id": "a" * 300}, "agent_id: at most 256 bytes"),
        ({"input_shape": (1, 0, 28)}, "input_shape: positive ints, got (1, 0, 28)"),
        ({"input_shape": ()}, "input_shape: positive ints"),
        ({"input_shape": (1.0, 2)}, "input_shape: positive ints"),
        ({"input_shape": "1,28,28"}, "input_shape: positive ints"),
        ({"input_shape": (1,) * 8}, "input_shape: at most 7 dimensions"),
        ({"input_dtype": "no-such-type"}, "input_dtype: a numpy dtype"),
        ({"class_names": "abc"}, "class_names: a sequence of strings"),
        ({"class_names": ("a", "a")}, "class_names: must be distinct"),
        ({"class_names": ("a", "")}, "class_names: non-empty strings"),
        ({"input_range": (1, 0)}, "input_range: finite lo < hi, got (1, 0)"),
        ({"input_range": (0, 1, 2)}, "input_range: (lo, hi)"),
        ({"privacy": "laplace"}, "privacy: bad privacy spec 'laplace'"),
        ({"privacy": "laplace:-1"}, "privacy: epsilon must be > 0"),
        ({"privacy": 3}, "privacy: None, a PrivacyNoise or a spec like 'gaussian:EPS', got 3"),
        ({"batch_window_us": -1}, "batch_window_us: must be >= 0, got -1"),
        ({"max_batch_items": 0}, "max_batch_items: must be > 0, got 0"),
        ({"rt_ttl_s": -1}, "rt_ttl_s: must be >= 0, got -1"),
        ({"ft_max_age_s": 0}, "ft_max_age_s: must be > 0, got 0"),
        ({"echo_interval_s": float("inf")}, "echo_interval_s: must be > 0, got inf"),
        ({"echo_interval_s": "1"}, "echo_interval_s: a number of seconds, got '1'"),
        ({"echo_unreplied_limit": 0}, "echo_unreplied_limit: must be > 0, got 0"),
        ({"backoff_cap_s": 0.01}, "backoff_cap_s: must be >= backoff_initial_s (0.05)"),
        ({"connect_timeout_s": -1}, "connect_timeout_s: must be >= 0, got -1"),
        ({"metrics_port": 65536}, "metrics_port: must be <= 65535, got 65536"),
        ({"metrics_port": -1}, "metrics_port: must be >= 0, got -1"),
        ({"fingerprint_key": "secret"}, "fingerprint_key: bytes, got str"),
        ({"fingerprint_key": b"k" * 65}, "fingerprint_key: at most 64 bytes, got 65"),
        ({"limits": {}}, "limits: an openexample.limits.Limits"),
        ({"seed": -1}, "seed: must be >= 0, got -1"),
        ({"tls_ca": None}, "tls_ca: a file path (str), got None"),
        ({"tls_cert": 3}, "tls_cert: a file path (str), got 3"),
        ({"plaintext": "yes"}, "plaintext: True or False, got 'yes'"),
        (
            {"plaintext": True, "controller": "10.0.0.1:6653"},
            "controller: plaintext only on loopback or a Unix socket, got grpc://10.0.0.1:6653",
        ),
        (
            {"plaintext": True, "controller": "tcp://ctl.example:6654"},
            "controller: plaintext only on loopback",
        ),
        ({"tls_server_name": 1}, "tls_server_name: a string, got 1"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_the_value(change, message):
    with pytest.raises(ConfigError) as e:
        AgentConfig(**change)
    assert message in str(e.value)
    # the same check through replace / from_overrides (what attach uses)
    with pytest.raises(ConfigError, match=message.split(":")[0]):
        AgentConfig().replace(**change)
    with pytest.raises(ConfigError, match=message.split(":")[0]):
        AgentConfig.from_overrides(None, **change)


def test_tls_settings_default_to_tls_and_are_read_only_for_a_channel(tmp_path):
    cfg = AgentConfig()  # no files needed to make one
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name) == ("", "", "", "")
    assert cfg.plaintext is False
    with pytest.raises(ConfigError) as e:
        cfg.tls_files()
    assert str(e.value).startswith("tls_ca: required")
    assert "plaintext" in str(e.value)  # the way out is named
    # plaintext on loopback and unix sockets only; then no TLS files at all
    for ok in ("127.0.0.1:1", "localhost:1", "[::1]:1", "tcp://127.0.0.2:1", "unix:///s"):
        assert AgentConfig(controller=ok, plaintext=True).tls_files() is None
    missing = AgentConfig(tls_ca=str(tmp_path / "ca.crt"), tls_cert="x", tls_key="y")
    with pytest.raises(ConfigError, match=r"tls_ca: cannot read .*ca\.crt"):
        missing.tls_files()


def test_config_error_is_the_shared_local_error_class():
    from controller.config import ConfigError as ControllerConfigError

    assert ControllerConfigError is ConfigError
    assert issubclass(ConfigError, OpenExampleError) and issubclass(ConfigError, ValueError)
    assert issubclass(ProtocolError, OpenExampleError)
    assert not issubclass(ConfigError, ProtocolError)
    import agents

    assert agents.ConfigError is ConfigError and agents.AgentConfig is AgentConfig


def test_unknown_override_keys_are_refused_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        AgentConfig.from_overrides(None, budget_usec=5)
    text = str(e.value)
    assert text.startswith("budget_usec: unknown agent setting")
    for name in ("budget_us", "fail_mode", "controller", "input_shape", "seed"):
        assert name in text
    assert set(field_names()) == {f.name for f in dataclasses.fields(AgentConfig)}
    with pytest.raises(ConfigError, match="bogus: unknown"):
        AgentConfig().replace(bogus=1)
    with pytest.raises(ConfigError, match="config: an AgentConfig"):
        AgentConfig.from_overrides({"budget_us": 5})  # type: ignore[arg-type]


def test_overrides_apply_on_a_base_and_leave_it_alone():
    base = AgentConfig(budget_us=500, model_id="m")
    cfg = AgentConfig.from_overrides(base, budget_us=900, fail_mode="secure")
    assert (cfg.budget_us, cfg.fail_mode, cfg.model_id) == (900, "secure", "m")
    assert base.budget_us == 500
    assert AgentConfig.from_overrides(base) is base
    assert AgentConfig.from_overrides(None) == AgentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.budget_us = 1  # type: ignore[misc]


def test_sequences_become_tuples_and_numbers_their_declared_kind():
    cfg = AgentConfig(
        input_shape=[1, np.int64(28), 28],
        class_names=["a", "b"],
        input_range=[0, 255],
        rt_ttl_s=3,
        connect_timeout_s=0,
        seed=np.int64(7),
        fingerprint_key=bytearray(b"k"),
        input_dtype=np.uint8,
        fail_mode="FAIL_MODE_SECURE",
    )
    assert cfg.input_shape == (1, 28, 28) and type(cfg.input_shape[1]) is int
    assert cfg.class_names == ("a", "b")
    assert cfg.input_range == (0.0, 255.0) and isinstance(cfg.input_range[0], float)
    assert isinstance(cfg.rt_ttl_s, float) and cfg.connect_timeout_s == 0.0
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert cfg.fingerprint_key == b"k" and type(cfg.fingerprint_key) is bytes
    assert cfg.input_dtype == "uint8"
    assert cfg.fail_mode == "secure"
    assert AgentConfig(class_names=None).class_names == ()  # type: ignore[arg-type]
    same = AgentConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    assert same == cfg and hash(same) == hash(cfg)  # tuples: hashable


def test_privacy_string_is_parsed_against_the_input_range():
    cfg = AgentConfig(privacy="laplace:2", input_range=(0, 255))
    assert cfg.privacy == PrivacyNoise("laplace", 2.0, input_range=(0.0, 255.0))
    assert cfg.privacy.resolved((4,)).centre == 127.5
    g = AgentConfig(privacy="gaussian:1:0.001").privacy
    assert (g.mechanism, g.epsilon, g.delta, g.clip, g.logits) == (
        "gaussian",
        1.0,
        0.001,
        None,  # the input box's radius, once the input shape is known
        "label",
    )
    assert AgentConfig(privacy="none").privacy.mechanism == "none"
    given = PrivacyNoise("laplace", 0.5)
    assert AgentConfig(privacy=given).privacy is given
    assert AgentConfig().privacy is None
    # noise whose clip and centre follow the config's range follows a new range
    moved = cfg.replace(input_range=(0, 1))
    assert moved.privacy.input_range == (0.0, 1.0)
    # a fixed centre does not: the ranges then disagree, and that is refused
    fixed = AgentConfig(privacy="gaussian:1,centre=100", input_range=(0, 255))
    with pytest.raises(ConfigError, match=r"privacy: noise for inputs in \(0.0, 255.0\)"):
        fixed.replace(input_range=(0, 1))


# ---- the CLI ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agents.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget-us", "-1"], "budget_us: must be > 0, got -1"),
        (["--fail-mode", "lenient"], "fail_mode: 'standalone' or 'secure', got 'lenient'"),
    ],
)
def test_cli_prints_one_line_and_exits_2_on_a_bad_value(tmp_path, flags, message):
    p = _cli(
        "attach",
        "--model",
        str(tmp_path / "m.pt"),
        "--controller",
        "127.0.0.1:6653",
        "--serve",
        "127.0.0.1:0",
        *flags,
    )
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"openexample-agent: error: {message}"]
    assert "Traceback" not in p.stderr + p.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--controller", "10.0.0.1:6653", "--plaintext"],
            "controller: plaintext only on loopback or a Unix socket, got grpc://10.0.0.1:6653",
        ),
        (["--controller", "127.0.0.1:6653"], "tls_ca: required"),
        (
            ["--controller", "127.0.0.1:6653", "--plaintext", "--serve-plaintext"],
            "serve: plaintext only on loopback or a Unix socket, got grpc://0.0.0.0:0",
        ),
    ],
)
def test_cli_tls_mistakes_are_one_line_and_exit_2(tmp_path, flags, message):
    p = _cli("attach", "--model", str(tmp_path / "m.pt"), "--serve", "0.0.0.0:0", *flags)
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"openexample-agent: error: {message}")
    assert "Traceback" not in p.stderr + p.stdout


def test_cli_tls_flags_reach_the_config_and_the_predict_listener(tmp_path):
    from agents.cli import build_parser, config_from_args, serve_tls
    from openexample.pki import DevPki

    files = DevPki(tmp_path).ensure(["agent/plc-1"]).files("agent/plc-1")
    base = ["attach", "--model", "m.pt", "--controller", "h:1", "--serve", "127.0.0.1:0"]
    tls = ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    args = build_parser().parse_args([*base, *tls, "--tls-server-name", "ctl.example"])
    cfg = config_from_args(args)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (
        str(files.ca),
        str(files.cert),
        str(files.key),
    )
    assert cfg.tls_server_name == "ctl.example" and not cfg.plaintext
    assert serve_tls(args, cfg) == files  # Predict is served with the agent's own files
    args = build_parser().parse_args([*base, "--serve-plaintext"])
    assert serve_tls(args, config_from_args(args)) is None
    args = build_parser().parse_args(
        [*base, "--controller", "unix:///s", "--plaintext", "--serve-plaintext"]
    )
    assert config_from_args(args).plaintext
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args([*base, "--serve-plaintext", "--serve-no-client-auth"])


def test_cli_defaults_are_the_agent_config_defaults():
    from agents.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["attach", "--model", "dir/mnist.pt", "--controller", "10.0.0.1:6653", "--serve", ":0"]
    )
    cfg = config_from_args(args)
    assert cfg == AgentConfig(controller="10.0.0.1:6653", model_id="mnist")
    flags = "--input-shape 1,28,28 --classes a,b --privacy laplace:1 --connect-timeout 0"
    flags += " --budget-us 900 --metrics-port 0"
    args = build_parser().parse_args(
        ["attach", "--model", "m.pt", "--controller", "h:1", "--serve", ":0", *flags.split()]
    )
    cfg = config_from_args(args)
    assert (cfg.input_shape, cfg.class_names, cfg.budget_us) == ((1, 28, 28), ("a", "b"), 900)
    assert cfg.privacy.mechanism == "laplace" and cfg.connect_timeout_s is None
    assert cfg.metrics_port == 0


# ---- attach ----------------------------------------------------------------------------


@pytest.fixture
def unused_controller():
    """A loopback address where nothing listens (bound, never listening: refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _logits(x: np.ndarray) -> np.ndarray:
    return np.tile(np.array([0.0, 1.0, 0.5], np.float32), (len(x), 1))


def test_attach_applies_overrides_on_a_config(unused_controller):
    from agents import attach

    cfg = AgentConfig(controller=unused_controller, model_id="tiny", budget_us=500, plaintext=True)
    guard = attach(_logits, cfg, budget_us=1234, fail_mode="secure")
    try:
        assert guard.config.budget_us == 1234 and guard.config.fail_mode == "secure"
        assert guard.config.model_id == "tiny" and guard.config.controller == unused_controller
        assert guard.config.agent_id.endswith("-tiny")  # filled in: <host>-<pid>-<model>
        assert cfg.budget_us == 500
    finally:
        guard.close()
    # keywords only, the README way
    guard = attach(
        _logits, controller=unused_controller, model_id="m", budget_us=777, plaintext=True
    )
    try:
        assert guard.config == AgentConfig(
            controller=unused_controller,
            model_id="m",
            budget_us=777,
            plaintext=True,
            agent_id=guard.config.agent_id,
        )
    finally:
        guard.close()


def test_attach_refuses_bad_settings_before_anything_starts(unused_controller):
    from agents import attach

    with pytest.raises(ConfigError, match="budget_us: must be > 0, got -1"):
        attach(_logits, controller=unused_controller, budget_us=-1)
    with pytest.raises(ConfigError, match="budget_usec: unknown agent setting"):
        attach(_logits, controller=unused_controller, budget_usec=5)
    with pytest.raises(ConfigError, match="config: an AgentConfig, got '127"):
        attach(_logits, unused_controller)  # the old positional controller
    threads = {t.name for t in threading.enumerate()}
    with pytest.raises(ConfigError, match="tls_ca: required"):
        attach(_logits, controller=unused_controller, input_shape=(2,))  # TLS by default
    assert {t.name for t in threading.enumerate()} == threads  # nothing started


def test_attach_with_a_known_shape_builds_the_core_from_the_config(unused_controller):
    from agents import attach

    guard = attach(
        _logits,
        controller=unused_controller,
        plaintext=True,
        model_id="tiny",
        input_shape=(2,),
        budget_us=4321,
        class_names=["a", "b", "c"],
    )
    try:
        assert guard.input_shape == (2,) and guard.model_id == "tiny"
        assert not guard.connected
    finally:
        guard.close()
    with pytest.raises(ConfigError, match="class_names: 2 names for 3 logits"):
        attach(
            _logits,
            controller=unused_controller,
            plaintext=True,
            input_shape=(2,),
            class_names=["a", "b"],
        )
