"""deploy/cluster/: three controllers on a two-node EMQX cluster. There is no Docker where
the tests run: what the stack relies on is read from its files (the services and what
they mount, the controllers' configs as the daemon loads them, the broker's ACL against
the one the tests' Mosquitto enforces)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from bench.procs import ROOT

HERE = ROOT / "deploy" / "cluster"
CONTROLLERS = ("ctl-a", "ctl-b", "ctl-c")


def _services() -> dict:
    return yaml.safe_load((HERE / "docker-compose.yml").read_text())["services"]


def test_compose_names_two_emqx_nodes_and_three_controllers_with_files_that_exist():
    services = _services()
    assert {"train", "pki", "emqx1", "emqx2", *CONTROLLERS} == set(services)
    for name in ("emqx1", "emqx2"):
        image = services[name]["image"]
        assert re.fullmatch(r"emqx/emqx:5\.[0-8]\.\d+", image), image  # Apache-2.0 up to 5.8
        env = services[name]["environment"]
        seeds = env["EMQX_CLUSTER__STATIC__SEEDS"]
        assert env["EMQX_NODE_NAME"] in seeds and seeds.count("emqx@") == 2
        assert env["EMQX_LISTENERS__TCP__DEFAULT__ENABLE"] == "false"  # mTLS only
        assert env["EMQX_LISTENERS__SSL__DEFAULT__SSL_OPTIONS__FAIL_IF_NO_PEER_CERT"] == "true"
        assert env["EMQX_MQTT__PEER_CERT_AS_USERNAME"] == "cn"
        assert env["EMQX_MQTT__PEER_CERT_AS_CLIENTID"] == "cn"  # no session takeover
        assert env["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"
        assert f"broker-{name}.crt" in env["EMQX_LISTENERS__SSL__DEFAULT__SSL_OPTIONS__CERTFILE"]
    host_ports = []
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./pki/"):  # a folder the pki service fills
                assert "/pki/$$n/" in " ".join(services["pki"]["command"]), (name, vol)
                assert src == f"./pki/{name}", (name, vol)  # its own folder, no other's
            elif src.startswith("."):
                assert (HERE / src).exists(), (name, vol)
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
            else:
                assert spec["condition"] == "service_completed_successfully"
                assert "restart" not in services[dep], (name, dep)  # a one-shot
        host_ports += [p.rsplit(":", 1)[0] for p in svc.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))
    for name in CONTROLLERS:
        assert f"/etc/openexample/{name}.yml" in services[name]["command"]
        assert {"emqx1", "emqx2"} <= set(services[name]["depends_on"])


def test_each_controllers_config_loads_with_the_certificates_the_pki_service_makes(tmp_path):
    from controller.config import load
    from openexample.pki import DevPki

    services = _services()
    pki_command = " ".join(services["pki"]["command"])
    aliases = {
        alias
        for name in ("emqx1", "emqx2")
        for alias in services[name]["networks"]["bus"]["aliases"]
    }
    DevPki(tmp_path / "pki").ensure([f"controller/{n}" for n in CONTROLLERS])
    groups, priorities = set(), set()
    for name in CONTROLLERS:
        shutil.copy(HERE / f"{name}.yml", tmp_path / f"{name}.yml")
        cfg = load(tmp_path / f"{name}.yml")
        assert cfg.cluster_identity() == f"controller/{name}"
        assert f"--controller-id {name}" in pki_command
        host, port = cfg.cluster.host_port
        assert cfg.cluster.tls and port == 8883 and host in aliases
        assert f"--host {host}" in pki_command  # the broker's certificate names it
        assert f"--broker {host}" in pki_command
        assert set(cfg.cluster.members) == {f"controller/{n}" for n in CONTROLLERS}
        groups.add(cfg.cluster.group)
        priorities.add(cfg.cluster.priority)
    assert len(groups) == 1 and len(priorities) == len(CONTROLLERS)


def test_the_emqx_acl_is_the_one_the_tests_mosquitto_enforces(tmp_path):
    from bench.procs import BrokerProcess

    mosquitto = BrokerProcess(tmp_path / "broker", plaintext=True).acl_path.read_text()
    assert "pattern write openexample/v1/cluster/%u/#" in mosquitto
    assert "pattern write openexample/v1/cluster/+/+/answers/%u" in mosquitto
    rules = [
        line
        for line in (HERE / "acl.conf").read_text().replace("\n    ", " ").splitlines()
        if line.strip() and not line.startswith("%%")
    ]
    assert 'publish, ["openexample/v1/cluster/${username}/#"]' in rules[1]
    assert 'publish, ["openexample/v1/cluster/+/+/answers/${username}"]' in rules[2]
    assert "subscribe," in rules[0] and '"openexample/v1/cluster/#"' in rules[0]
    assert "$share/openexample-work/" in rules[0]
    assert rules[-1] == "{deny, all}."
    assert (HERE / "pki" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    assert Path(HERE / "README.md").exists()


def test_no_secret_is_checked_in_and_each_container_holds_only_its_own_key():
    compose = (HERE / "docker-compose.yml").read_text()
    services = _services()
    for name in ("emqx1", "emqx2"):
        env = services[name]["environment"]
        # the Erlang cookie (whoever has it runs code on the nodes) and the dashboard's
        # password come from the environment, and compose refuses to start without them
        assert re.fullmatch(r"\$\{EMQX_NODE_COOKIE:\?[^}]+\}", env["EMQX_NODE__COOKIE"])
        password = env["EMQX_DASHBOARD__DEFAULT_PASSWORD"]
        assert re.fullmatch(r"\$\{EMQX_DASHBOARD_PASSWORD:\?[^}]+\}", password)
        assert env["EMQX_LISTENERS__WS__DEFAULT__ENABLE"] == "false"
        assert env["EMQX_LISTENERS__WSS__DEFAULT__ENABLE"] == "false"
        for port in services[name].get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # the dashboard: this host only
    assert "change-me" not in compose
    assert ".env" in (HERE / ".gitignore").read_text().splitlines()
    pki = " ".join(services["pki"]["command"])
    for name in CONTROLLERS:
        mounts = [v for v in services[name]["volumes"] if v.startswith("./pki")]
        assert mounts == [f"./pki/{name}:/etc/openexample/pki:ro"]
        assert f"for n in {' '.join(CONTROLLERS)}; do" in pki
    assert "cp -p /pki/ca.crt /pki/controller-$$n.crt /pki/controller-$$n.key /pki/$$n/" in pki
    assert "cp -p /pki/ca.crt /pki/broker-$$n.crt /pki/broker-$$n.key /pki/$$n/" in pki
