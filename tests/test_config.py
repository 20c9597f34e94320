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
    cfg = load_text(tmp_path, "trace_window_s: 30\n")
    assert cfg.trace_window_s == 30.0 and isinstance(cfg.trace_window_s, float)
    assert cfg.listen == "127.0.0.1:6653" and cfg.metrics_port == 9464
    assert config.load(None) == config.Config()
