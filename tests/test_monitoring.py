"""Monitoring against the real thing: a Prometheus server scraping a running controller
and agents under load must answer every dashboard panel's query with data; promtool
checks the scraped metrics, the scrape config, the recording rules and their tests.

Needs the Debian package ``prometheus`` (``make test`` installs it via
scripts/system-deps.sh); skipped with that reason when it is absent.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from agents import attach
from tests.conftest import MODEL_ID

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "monitoring"
PROM_DIR = MON / "prometheus"
DASHBOARD = MON / "grafana" / "dashboards" / "openexample.json"
SHAPE = (1, 28, 28)


def _tool(name: str) -> str | None:
    path = Path("/usr/bin") / name
    return str(path) if path.exists() else shutil.which(name)


PROMETHEUS = _tool("prometheus")
PROMTOOL = _tool("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the Prometheus server is not installed (Debian package `prometheus`:"
    " `make test` installs it via scripts/system-deps.sh)",
)


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None):
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False
    )


def panels() -> list[dict]:
    out = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))  # panels of a collapsed row
        else:
            out.append(p)
    return out


# Template variables as a dashboard user with "All" selected sees them; the rate
# interval as Grafana computes it for a 1 s scrape interval (4 x scrape, at least).
VARIABLES = {"model": ".*", "agent": ".*", "__rate_interval": "5s", "__interval": "1s"}


def substitute(expr: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


# -- static checks (promtool, files) ---------------------------------------------------


def _prometheus_copy(dest: Path) -> Path:
    """monitoring/prometheus copied to ``dest`` with the client certificate its TLS job
    names (in tls/, as docker-compose.yml's pki service puts it there): promtool checks
    that the files exist. Returns the copied prometheus.yml."""
    from openexample.pki import DevPki

    def local(folder: str, names: list[str]) -> list[str]:  # keys a developer put there
        return names if Path(folder).name == "tls" else [n for n in names if n == ".gitignore"]

    shutil.copytree(PROM_DIR, dest, ignore=local)
    pki = DevPki(dest / "tls")
    pki.ensure(["reader/prometheus"])
    tls = _tls_job(yaml.safe_load((dest / "prometheus.yml").read_text()))["tls_config"]
    for key in ("ca_file", "cert_file", "key_file"):
        assert (dest / tls[key]).is_file(), (key, tls[key])
    return dest / "prometheus.yml"


def _tls_job(cfg: dict) -> dict:
    (job,) = [j for j in cfg["scrape_configs"] if j.get("scheme") == "https"]
    return job


@needs_prometheus
def test_promtool_check_config_and_rules(tmp_path):
    res = promtool("check", "config", str(_prometheus_copy(tmp_path / "prometheus")))
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    res = promtool("check", "rules", str(PROM_DIR / "rules.yml"))
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


@needs_prometheus
def test_promtool_test_rules():
    res = promtool("test", "rules", "rules_test.yml", cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "openexample" and dash["schemaVersion"] >= 36  # Grafana 10+
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model", "agent"} <= names
    for p in panels():
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
    # what the issue asks the dashboard to show
    titles = " | ".join(p["title"].lower() for p in panels())
    for want in (
        "p50 / p99 vs budget",
        "fast-path share",
        "adversarial rate by model and agent",
        "budget misses",
        "workload w vs w0",
        "connected agents",
        "per-detector latency",
        "sources with most adversarial verdicts",
        "incidents over time",
    ):
        assert want in titles, want


def test_provisioning_and_compose_point_at_files_that_exist():
    ds = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    dash = yaml.safe_load((MON / "grafana/provisioning/dashboards/openexample.yml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((MON / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"controller", "prometheus", "grafana"} <= set(services)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (MON / src).exists(), vol
    assert services["prometheus"]["network_mode"] == "service:controller"
    cfg = yaml.safe_load((MON / "controller.yml").read_text())
    assert cfg["metrics_port"] == 9464
    assert "localhost:9464" in (PROM_DIR / "prometheus.yml").read_text()


def _compose() -> dict:
    return yaml.safe_load((MON / "docker-compose.yml").read_text())


def _depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    if isinstance(deps, list):  # short syntax: started
        return {d: "service_started" for d in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def test_compose_has_health_checks_and_orders_on_them():
    # no Docker where the tests run (`docker compose config` would only check the
    # schema anyway): what the stack relies on, read from the YAML
    services = _compose()["services"]
    long_running = {name for name, svc in services.items() if svc.get("restart")}
    assert {"controller", "prometheus", "grafana"} <= long_running
    for name in long_running:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, (name, key)
    one_shot = set(services) - long_running
    assert {"train", "pki"} <= one_shot
    for name, svc in services.items():
        for dep, condition in _depends_on(svc).items():
            assert dep in services, (name, dep)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
            elif condition == "service_completed_successfully":
                assert dep in one_shot, (name, dep)
            else:
                assert condition == "service_started", (name, dep, condition)
    assert _depends_on(services["grafana"])["prometheus"] == "service_healthy"
    for name in ("controller", "prometheus"):
        assert _depends_on(services[name])["pki"] == "service_completed_successfully"
    # what each probe asks: the controller's /readyz on its metrics port, in the image's
    # python (no curl there); Prometheus and Grafana with their images' wget
    cfg = yaml.safe_load((MON / "controller.yml").read_text())
    probe = " ".join(services["controller"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{cfg['metrics_port']}/readyz" in probe and "python" in probe
    assert "python:3" in (MON / "Dockerfile").read_text()
    assert "http://localhost:9090/-/ready" in services["prometheus"]["healthcheck"]["test"]
    assert "http://localhost:3000/api/health" in services["grafana"]["healthcheck"]["test"]


def test_compose_prometheus_reaches_agents_on_the_host():
    services = _compose()["services"]
    prom = services["prometheus"]
    # extra_hosts belong to the service whose network namespace Prometheus joins
    owner = prom["network_mode"].removeprefix("service:")
    assert "extra_hosts" not in prom
    assert "host.docker.internal:host-gateway" in services[owner]["extra_hosts"]
    # every file_sd glob of the scrape config matches files that parse as target groups
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = {}
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            for pattern in sd["files"]:
                files = sorted(PROM_DIR.glob(pattern))
                assert files, (job["job_name"], pattern)
                for f in files:
                    groups = yaml.safe_load(f.read_text())
                    assert isinstance(groups, list), f
                    for g in groups:
                        assert set(g) <= {"targets", "labels"}, f
                        assert isinstance(g.get("labels", {}), dict), f
                        for t in g["targets"]:
                            host, _, port = t.rpartition(":")
                            assert host and 0 < int(port) < 65536, (f, t)
                        targets.setdefault(job["job_name"], []).extend(g["targets"])
    # an agent on the Docker host: non-loopback, so TLS (AgentConfig refuses plain HTTP)
    tls_job = _tls_job(cfg)
    assert any(t.startswith("host.docker.internal:") for t in targets[tls_job["job_name"]])
    from agents.config import AgentConfig
    from openexample.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics_tls"):
        AgentConfig(metrics_port=9465, metrics_addr="0.0.0.0")
    AgentConfig(metrics_port=9465, metrics_addr="0.0.0.0", metrics_tls=True)
    # its client certificate: the pki service writes the volume Prometheus reads in tls/
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    tls_dir = "/etc/prometheus/" + tls_job["tls_config"]["cert_file"].rpartition("/")[0]
    volume = mounts[tls_dir]
    assert (PROM_DIR / tls_dir.removeprefix("/etc/prometheus/")).is_dir()  # mount point
    pki = services["pki"]
    assert any(v.startswith(f"{volume}:") for v in pki["volumes"])
    command = " ".join(pki["command"])
    for key in ("ca_file", "cert_file", "key_file"):
        name = tls_job["tls_config"][key].rpartition("/")[2]
        assert f"/pki/{name}" in command, name
    # the controller's certificate is one the pki service makes, mounted where
    # controller.yml's relative paths point
    ctl = yaml.safe_load((MON / "controller.yml").read_text())
    assert (
        f"./pki:/etc/openexample/{ctl['tls_ca'].rpartition('/')[0]}:ro"
        in (services["controller"]["volumes"])
    )
    assert f"--controller-id {ctl['controller_id']}" in command
    assert ctl["tls_cert"].endswith(f"controller-{ctl['controller_id']}.crt")
    # keys never enter the image: the build context is the repository root
    ignored = (MON / "Dockerfile.dockerignore").read_text().split()
    assert {"monitoring/pki", "monitoring/prometheus/tls"} <= set(ignored)


def test_metric_catalogue_is_fresh():
    from bench.metrics_catalogue import OUT, render

    assert OUT.read_text() == render(), (
        "docs/metrics.md is stale: run `python -m bench.metrics_catalogue`"
    )


# -- agent metrics: lock-free latency histogram, shared registries -------------------


def _agent_core(agent_id: str):
    from agents.config import AgentConfig
    from agents.core import AgentCore
    from agents.results import ModelInfo

    return AgentCore(
        agent_id, [ModelInfo("m", (1,), ("0", "1"))], AgentConfig(budget_us=350), now=0.0
    )


def _samples(registry, name: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in registry.collect()
        for s in fam.samples
        if s.name.startswith(name)
    }


def test_agent_latency_histogram_counts_every_observation_from_many_threads():
    from prometheus_client import CollectorRegistry

    from agents.metrics import AgentMetrics

    reg = CollectorRegistry()
    metrics = AgentMetrics(_agent_core("a"), threading.Lock(), reg, (350,))
    observe = metrics.observer("m")

    def work() -> None:
        for i in range(5000):
            observe(1e-5 * (i % 50))  # 0 .. 490 us

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    observe(1.0)  # this thread's shard: +Inf bucket
    got = _samples(reg, "openexample_agent_added_latency_seconds")
    lab = (("agent", "a"), ("model", "m"))
    count = got[("openexample_agent_added_latency_seconds_count", lab)]
    assert count == 20_001
    values = [1e-5 * k for k in range(50)]
    expected_sum = 4 * 100 * sum(values) + 1.0
    assert got[("openexample_agent_added_latency_seconds_sum", lab)] == pytest.approx(expected_sum)

    def bucket(le: str) -> float:
        return got[("openexample_agent_added_latency_seconds_bucket", (lab[0], ("le", le), lab[1]))]

    # the budget (350 us) is a bucket boundary
    assert bucket("0.00035") == 4 * 100 * sum(v <= 350e-6 for v in values)
    assert bucket("0.1") == 20_000 and bucket("+Inf") == 20_001
    # finished threads were folded into the total: a second scrape says the same
    assert _samples(reg, "openexample_agent_added_latency_seconds") == got


@needs_prometheus
def test_guards_sharing_a_registry_expose_valid_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from agents.metrics import AgentMetrics

    reg = CollectorRegistry()
    cores = [_agent_core("a"), _agent_core("b")]
    for core in cores:
        AgentMetrics(core, threading.Lock(), reg, (350,)).observer("m")(2e-5)
    text = generate_latest(reg)
    res = promtool("check", "metrics", stdin=text)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    got = _samples(reg, "openexample_agent_added_latency_seconds_count")
    assert sorted(dict(k[1])["agent"] for k in got) == ["a", "b"]
    assert b'openexample_agent_decisions_total{agent="b",decided_by="rt",model="m"} 0.0' in text


def _rule_budgets(registry) -> dict[tuple[str, str], float]:
    got = _samples(registry, "openexample_agent_rule_budget_seconds")
    return {(dict(k[1])["model"], dict(k[1])["rule"]): v for k, v in got.items()}


def test_agent_exposes_the_budget_of_each_inspect_rule_it_applies():
    from prometheus_client import CollectorRegistry

    from agents.config import AgentConfig
    from agents.core import AgentCore
    from agents.metrics import MAX_RULE_BUDGET_SERIES, AgentMetrics
    from agents.results import ModelInfo
    from openexample import rules
    from openexample.v1 import openexample_pb2 as pb

    models = [ModelInfo(m, (1,), ("0", "1")) for m in ("m", "n")]
    core = AgentCore("a", models, AgentConfig(budget_us=350), now=0.0)
    reg = CollectorRegistry()
    AgentMetrics(core, threading.Lock(), reg, (350,))
    # the agent's own default, per model
    assert _rule_budgets(reg) == {("m", "table-miss"): 350e-6, ("n", "table-miss"): 350e-6}

    def add(priority: int, match: pb.Match, action: pb.Action) -> None:
        core.rules.apply(
            rules.vigilance_mod(rules.ADD, match=match, priority=priority, actions=[action]), 0.0
        )

    add(40000, pb.Match(model_id="m", label=3), rules.inspect(123_456))
    add(30000, pb.Match(confidence_max=0.5), rules.inspect(2_000_000, "secure"))
    add(50000, pb.Match(source_id="s"), rules.drop())  # no budget: not INSPECT
    add(45000, pb.Match(model_id="other"), rules.inspect(1))  # a model it does not serve
    assert _rule_budgets(reg) == {
        ("m", "prio=40000 match=model=m,label=3"): 0.123456,
        ("m", "prio=30000 match=confidence=:0.5"): 2.0,
        ("n", "prio=30000 match=confidence=:0.5"): 2.0,
        ("m", "table-miss"): 350e-6,
        ("n", "table-miss"): 350e-6,
    }
    # the controller's default replaces the agent's; a deleted rule's series goes
    add(0, pb.Match(), rules.inspect(10_000))
    core.rules.apply(
        rules.vigilance_mod(
            rules.DELETE_STRICT, match=pb.Match(model_id="m", label=3), priority=40000
        ),
        0.0,
    )
    got = _rule_budgets(reg)
    assert ("m", "prio=40000 match=model=m,label=3") not in got
    assert got[("m", "table-miss")] == got[("n", "table-miss")] == 0.01
    # a table-miss that no longer inspects has no budget
    add(0, pb.Match(), rules.allow())
    assert {rule for _, rule in _rule_budgets(reg)} == {"prio=30000 match=confidence=:0.5"}
    # two rules whose labels read alike (bounds equal to 6 digits): one series, the
    # first in lookup order, so the exposition stays valid
    add(20000, pb.Match(confidence_min=0.5), rules.inspect(7))
    add(20000, pb.Match(confidence_min=0.50000006), rules.inspect(8))
    assert _rule_budgets(reg)[("n", "prio=20000 match=confidence=0.5:")] == 7e-6
    # bounded: thousands of rules, at most MAX_RULE_BUDGET_SERIES per agent and model,
    # the highest priorities first, the table-miss kept
    add(0, pb.Match(), rules.inspect(10_000))
    for i in range(200):
        add(1000 + i, pb.Match(model_id="m", label=i), rules.inspect(1000 + i))
    got = _rule_budgets(reg)
    on_m = {rule for model, rule in got if model == "m"}
    assert len(on_m) == MAX_RULE_BUDGET_SERIES and "table-miss" in on_m
    assert "prio=1199 match=model=m,label=199" in on_m
    assert "prio=30000 match=confidence=:0.5" in on_m


def test_controller_detector_margins_match_per_item_histograms_and_top_k_is_bounded():
    from prometheus_client import CollectorRegistry, Histogram

    from controller.core import Incident
    from controller.metrics import MARGIN_BUCKETS, ControllerMetrics

    reg = CollectorRegistry()
    m = ControllerMetrics(reg, 350e-6, 4096, models=["m"], top_k=3)
    rng = np.random.default_rng(1)
    margins = rng.normal(-1.0, 1.5, (2, 500))
    margins[0, :5] = MARGIN_BUCKETS[:5]  # values on the boundaries count as <= le
    flags = margins >= 0
    m.observe_detectors("m", ["d1", "d2"], [1e-4, 2e-4, 3e-4], margins, flags)
    ref_reg = CollectorRegistry()
    ref = Histogram("ref", "per item", ["detector"], buckets=MARGIN_BUCKETS, registry=ref_reg)
    for j, name in enumerate(["d1", "d2"]):
        for v in margins[j]:
            ref.labels(name).observe(float(v))
    got = _samples(reg, "openexample_controller_detector_margin")
    want = _samples(ref_reg, "ref")
    for (name, labels), value in want.items():
        if not name.endswith("_bucket"):  # negative buckets: no _sum/_count (OpenMetrics)
            continue
        key = (name.replace("ref", "openexample_controller_detector_margin"), labels)
        key = (key[0], tuple(sorted((*labels, ("model", "m")))))
        assert got[key] == pytest.approx(value), key
    flagged = _samples(reg, "openexample_controller_detector_flagged_items_total")
    assert flagged[
        (
            "openexample_controller_detector_flagged_items_total",
            (("detector", "pipeline"), ("model", "m")),
        )
    ] == int(flags.any(axis=0).sum())

    incidents = [
        Incident(0.0, "a", "m", src, 0, None, 1.0, "[]")
        for src in ["s1"] * 5 + ["s2"] * 3 + ["s3"] * 2 + [f"x{i}" for i in range(50)]
    ]
    m.record_incidents(incidents)
    top = _samples(reg, "openexample_controller_top_source_adversarial_verdicts")
    assert {dict(k[1])["source"]: v for k, v in top.items()} == {"s1": 5, "s2": 3, "s3": 2}
    assert _samples(reg, "openexample_controller_incidents_total")[
        ("openexample_controller_incidents_total", (("model", "m"),))
    ] == len(incidents)


# -- the live check ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class PrometheusServer:
    """/usr/bin/prometheus on loopback, 1 s scrape and rule evaluation, with the
    repository's scrape config and recording rules pointed at the given targets."""

    def __init__(
        self,
        workdir: Path,
        controller: str,
        agents: list[str],
        tls_agents: list[str] = (),
        tls_files=None,
    ) -> None:
        """``tls_agents`` serve metrics over TLS: the repository's HTTPS job scrapes them
        with ``tls_files`` (the CA and a client certificate from it) in place of tls/."""
        cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
        jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
        jobs["openexample-controller"]["static_configs"] = [{"targets": [controller]}]
        for job, targets in (
            ("openexample-agents", agents),
            ("openexample-agents-tls", tls_agents),
        ):
            agents_file = workdir / f"{job}.yml"
            agents_file.write_text(yaml.safe_dump([{"targets": list(targets)}]))
            jobs[job]["file_sd_configs"] = [{"files": [str(agents_file)]}]
        tls = jobs["openexample-agents-tls"]["tls_config"]
        if tls_files is not None:  # server_name stays: the agent's certificate names it
            tls.update(
                ca_file=str(tls_files.ca),
                cert_file=str(tls_files.cert),
                key_file=str(tls_files.key),
            )
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(f"{self.url}/-/ready", 1).strip():
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not start:\n" + self.log.read_text())
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        qs = urllib.parse.urlencode({"query": expr})
        body = json.loads(_get(f"{self.url}/api/v1/query?{qs}"))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def api(self, path: str) -> dict:
        return json.loads(_get(f"{self.url}{path}"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _fgsm(model_path: Path, x: np.ndarray, y: np.ndarray, eps: float = 0.3) -> np.ndarray:
    """FGSM (L-inf eps) on the example model, plain torch (ART is for the bench)."""
    import torch

    from controller.reference_model import load_model

    model = load_model(model_path).eval()
    xt = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(xt), torch.tensor(y, dtype=torch.long))
    loss.backward()
    return (xt + eps * xt.grad.sign()).clamp(0.0, 1.0).detach().numpy().astype(np.float32)


def _finite(result: list[dict]) -> bool:
    return any("value" in r and math.isfinite(float(r["value"][1])) for r in result)


@needs_prometheus
@pytest.mark.integration
def test_every_dashboard_query_returns_data_from_a_live_controller_and_agents(
    controller, example_model, mnist, tmp_path
):
    # budget generous enough for a shared CI box; a few agents, each with its endpoint
    proc = controller(budget_us=200_000)
    # the last agent serves its metrics over TLS (what any address but loopback needs,
    # e.g. an agent on the Docker host): Prometheus's HTTPS job scrapes it
    guards = [
        attach(
            str(example_model),
            controller=proc.address,
            model_id=MODEL_ID,
            agent_id=f"agent-{i}",
            input_shape=SHAPE,
            connect_timeout_s=20,
            metrics_port=0,
            metrics_tls=i == 2,
            **proc.agent_tls(f"agent-{i}"),
        )
        for i in range(3)
    ]
    stop = threading.Event()
    errors: list[BaseException] = []
    prom = None
    try:
        assert all(g.connected for g in guards), "an agent did not reach MAIN"
        clean = mnist.test.x[:200]
        adv = _fgsm(example_model, mnist.test.x[200:260], mnist.test.y[200:260])

        def load() -> None:
            # clean traffic from a few users; FGSM from attackers, repeated inputs
            # (RT hits after the controller pushes them) and sources that get blocked
            # (their inferences are then dropped by a rule on the agent they use).
            rng = np.random.default_rng(0)
            i = 0
            try:
                while not stop.is_set():
                    g = guards[i % len(guards)]
                    # a little noise: fresh fingerprints, so clean inputs keep going to
                    # the controller instead of all becoming RT hits after one pass
                    x = clean[i % len(clean)] + rng.uniform(0, 1e-3, SHAPE).astype(np.float32)
                    g(x, source_id=f"user-{i % 7}")
                    if i % 4 == 0:
                        g(adv[(i // 4) % len(adv)], source_id=f"attacker-{(i // 40) % 3}")
                    if i % 10 == 0:
                        g.batch(clean[:4], source_id="batch-user")
                    i += 1
                    time.sleep(0.002)
            except BaseException as exc:  # surfaced by the test thread
                errors.append(exc)

        loader = threading.Thread(target=load, name="load", daemon=True)
        loader.start()

        agent_targets = [f"127.0.0.1:{g.metrics_port}" for g in guards]
        prom = PrometheusServer(
            tmp_path,
            f"127.0.0.1:{proc.metrics_port}",
            agent_targets[:2],
            agent_targets[2:],
            proc.pki.issue("reader/prometheus", overwrite=False),
        )

        # promtool on what Prometheus scrapes: the controller's and an agent's output
        for target in (f"127.0.0.1:{proc.metrics_port}", agent_targets[0]):
            text = _get(f"http://{target}/metrics")
            assert b"openexample_" in text
            res = promtool("check", "metrics", stdin=text)
            assert res.returncode == 0, (target, res.stdout.decode(), res.stderr.decode())

        queries = [
            (p["title"], t["refId"], substitute(t["expr"])) for p in panels() for t in p["targets"]
        ]
        deadline = time.monotonic() + 45
        while True:
            missing = [(title, ref, q) for title, ref, q in queries if not _finite(prom.query(q))]
            if not missing or time.monotonic() > deadline:
                break
            assert not errors, errors
            time.sleep(1.0)

        targets = prom.api("/api/v1/targets")["data"]["activeTargets"]
        health = {(t["labels"]["job"], t["scrapeUrl"]): t["health"] for t in targets}
        assert set(health.values()) == {"up"}, health
        assert {job for job, url in health if url.startswith("https://")} == {
            "openexample-agents-tls"
        }
        assert not errors, errors
        assert not missing, "panel queries without data:\n" + "\n".join(
            f"  {title} [{ref}]: {q}" for title, ref, q in missing
        )
        # the template variables' label_values() queries
        for label in ("model", "agent"):
            qs = urllib.parse.urlencode({"match[]": "openexample_agent_decisions_total"})
            assert prom.api(f"/api/v1/label/{label}/values?{qs}")["data"], label
        # and the load did what the panels claim to show
        adversarial = prom.query('sum(openexample_agent_verdicts_total{verdict="adversarial"})')
        assert float(adversarial[0]["value"][1]) > 0
        assert prom.query("openexample_controller_top_source_adversarial_verdicts")
        _check_rule_budgets(proc, prom, [f"agent-{i}" for i in range(len(guards))])
        # the compose file's probe of the controller, on this one's metrics port
        probe = _compose()["services"]["controller"]["healthcheck"]["test"][1:]
        port = yaml.safe_load((MON / "controller.yml").read_text())["metrics_port"]
        probe = [a.replace(f":{port}/", f":{proc.metrics_port}/") for a in probe]
        assert subprocess.run(probe, timeout=30, check=False).returncode == 0
    finally:
        stop.set()
        for g in guards:
            g.close()
        if prom is not None:
            prom.stop()


def _wait_for(prom: PrometheusServer, expr: str, done, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = prom.query(expr)
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def _check_rule_budgets(proc, prom: PrometheusServer, agent_ids: list[str]) -> None:
    """An operator's INSPECT rule shows on every agent with its budget, on the budget
    panels one line per rule; deleted, its series goes."""
    from openexample import rules
    from openexample.v1 import admin_pb2, admin_pb2_grpc
    from openexample.v1 import openexample_pb2 as pb

    (budget_query,) = {
        t["expr"]
        for p in panels()
        if "vs budget" in p["title"].lower()
        for t in p["targets"]
        if "rule_budget" in t["expr"]
        and "$agent" in t["expr"]  # the agent panel's; the controller one has no $agent
    }
    label = f"prio=40000 match=model={MODEL_ID},label=3"
    expr = f'openexample_agent_rule_budget_seconds{{rule="{label}"}}'
    match = pb.Match(model_id=MODEL_ID, label=3)
    channel = proc.channel_as("operator/monitoring")
    admin = admin_pb2_grpc.ControllerAdminStub(channel)
    try:
        add = rules.vigilance_mod(
            rules.ADD, match=match, priority=40000, actions=[rules.inspect(123_456)]
        )
        # (an agent that reconnects meanwhile gets it in its resync: desired state)
        answer = admin.ModRules(admin_pb2.ModRulesRequest(mod=add), timeout=20)
        assert not [r for r in answer.results if r.HasField("error")], answer
        got = _wait_for(prom, expr, lambda r: len(r) == len(agent_ids))
        assert sorted(r["metric"]["agent"] for r in got) == sorted(agent_ids), got
        assert {float(r["value"][1]) for r in got} == {0.123456}
        assert {r["metric"]["model"] for r in got} == {MODEL_ID}
        lines = {
            r["metric"]["rule"]: float(r["value"][1]) for r in prom.query(substitute(budget_query))
        }
        assert lines == {"table-miss": 0.2, label: 0.123456}, lines

        delete = rules.vigilance_mod(rules.DELETE_STRICT, match=match, priority=40000)
        answer = admin.ModRules(admin_pb2.ModRulesRequest(mod=delete), timeout=20)
        assert not [r for r in answer.results if r.HasField("error")], answer
        assert _wait_for(prom, expr, lambda r: not r) == []
        lines = {r["metric"]["rule"] for r in prom.query(substitute(budget_query))}
        assert lines == {"table-miss"}
    finally:
        channel.close()
