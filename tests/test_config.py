import pytest

from controller import config
from controller.config import ConfigError


def load_text(tmp_path, text, suffix=".yaml"):
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    return config.load(p)


def test_yaml_and_toml_give_the_same_config(tmp_path):
    y = load_text(tmp_path, "budget_us: 500\nmodels:\n  m:\n    detectors: [a, b]\n    fpr: 0.02\n")
    t = load_text(
        tmp_path,
        'budget_us = 500\n[models.m]\ndetectors = ["a", "b"]\nfpr = 0.02\n',
        ".toml",
    )
    assert y == t
    assert y.budget_us == 500 and y.models["m"].detectors == ("a", "b")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("budget_usec: 5", "budget_usec: unknown key"),
        ("budget_us: fast", "budget_us: expected int"),
        ("budget_us: true", "budget_us: expected int"),
        ("budget_us: 0", "budget_us: want 1..60000000"),
        ("fail_mode: lenient", "fail_mode: want one of"),
        ("listen: localhost", "listen: HOST:PORT, got 'localhost' (no port"),
        ("echo_interval_s: -1", "echo_interval_s: must be > 0"),
        ("models: {m: {fpr: 2}}", "models.m.fpr: must be in (0, 1)"),
        ("models: {m: {detector: [a]}}", "models.m.detector: unknown key"),
        ("models: {m: {detectors: [1]}}", "models.m.detectors[0]: expected str"),
        ("- a list", "config: expected dict"),
        ("budget_us: [", "not valid YAML"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, text, names):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    assert names in str(e.value)
    assert str(tmp_path) in str(e.value)  # and the file


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")


def test_floats_accept_ints_and_defaults_hold(tmp_path):
    cfg = load_text(tmp_path, "trace_half_life_s: 30\n")
    assert cfg.trace_half_life_s == 30.0 and isinstance(cfg.trace_half_life_s, float)
    assert cfg.listen == "127.0.0.1:6653" and cfg.metrics_port == 9464
    assert config.load(None) == config.Config()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("plaintext: true\nlisten: 0.0.0.0:6653", "listen: plaintext only on loopback"),
        ("plaintext: true\nlisten: [127.0.0.1:1, 'tcp://10.0.0.1:2']", "plaintext only"),
        ("metrics_addr: 0.0.0.0", "metrics_addr: 0.0.0.0 is not loopback: set metrics_tls"),
        ("fingerprint_key: xyz", "fingerprint_key: hex digits"),
        ("trace_alpha: 2", "trace_alpha: must be in (0, 1)"),
        ("trace_window_s: 60", "trace_window_s: unknown key"),
    ],
)
def test_security_settings_are_checked(tmp_path, text, names):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    assert names in str(e.value)


def test_tls_is_required_unless_plaintext_and_paths_are_from_the_config_folder(tmp_path):
    import datetime as dt

    from openexample.pki import DevPki

    with pytest.raises(ConfigError, match="tls_ca: required"):
        config.Config().tls_files()
    assert config.Config(plaintext=True).tls_files() is None
    pki = DevPki(tmp_path / "pki").ensure(["controller/c1"])
    cfg = load_text(
        tmp_path,
        "tls_ca: pki/ca.crt\ntls_cert: pki/controller-c1.crt\ntls_key: pki/controller-c1.key\n",
    )
    files = cfg.tls_files()
    assert files.ca == tmp_path / "pki" / "ca.crt" and str(files.identity()) == "controller/c1"
    # An expired certificate is refused at start, naming the file and the date.
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    pki.issue("controller/old", not_before=old, days=1)
    stale = cfg.replace(tls_cert="pki/controller-old.crt", tls_key="pki/controller-old.key")
    with pytest.raises(ConfigError, match=r"tls_cert: .*controller-old.crt expired on"):
        stale.tls_files()


def test_the_readme_config_loads(tmp_path):
    """The README's controller.yaml, with its pki/ folder next to it, is a valid config."""
    import re

    from bench.procs import ROOT
    from openexample.pki import DevPki

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(# controller\.yaml.*?)```", text, re.S)[1]
    DevPki(tmp_path / "pki").ensure(["controller/controller-1"])
    cfg = load_text(tmp_path, block)
    assert cfg.tls_files().cert == tmp_path / "pki" / "controller-controller-1.crt"
    assert cfg.trace_alpha == 1e-6 and not cfg.plaintext
    assert [r.actions for r in cfg.rules] == [("drop",), ("inspect:400000:secure",)]
