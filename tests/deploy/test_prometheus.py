"""deploy/prometheus and deploy/grafana with the real tools: promtool checks and rule unit tests, then a
real Prometheus scraping a live ``python -m server`` with the shipped recording rules loaded, and every
query of the Grafana dashboard run against it."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    DEPLOY,
    TINY_NUM_LAYERS,
    LiveServer,
    free_port,
    http_json,
    require_tool,
    stop_process,
    wait_until_ok,
)

PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "exitserve.json"
NUM_FAST = 7  # speed 1: exit at the first ramp
NUM_FULL = 5  # speed 0: run every layer
NUM_INVALID = 2  # 422s, so the error panels have data
# Grafana's variables, as the dashboard uses them, with values that select everything the test made.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "15s", "$model": ".+"}
# Queries with no data until the live guard has re-run sampled early exits (1 % of them, in spare
# capacity): the test's few requests give none. They must still be valid PromQL that Prometheus runs.
NEEDS_SHADOW_SAMPLES = {'exitserve:guard_agreement:ratio_1h{model=~".+"}'}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
    )


def test_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules/alerts.yml" in result.stdout and "SUCCESS" in result.stdout


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout  # recording.yml
    assert "SUCCESS: 11 rules found" in result.stdout  # alerts.yml


def test_promtool_alert_unit_tests() -> None:
    result = promtool("test", "rules", "tests/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS_DIR / "tests" / "alerts_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts == tested


# --- a real Prometheus scraping the live server -----------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        status, _, body = http_json(url)
        assert status == 200 and body["status"] == "success", f"{expr}: {status} {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, check: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Query until ``check(result)`` holds (scrapes and rule evaluations take a second or two)."""
        deadline = time.monotonic() + timeout_s
        result = self.query(expr)
        while not check(result) and time.monotonic() < deadline:
            time.sleep(0.5)
            result = self.query(expr)
        return result


def scalar(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if len(result) == 1 else None


def finite(result: list[dict[str, Any]]) -> bool:
    """One series with a number (a rule's first evaluations, before two scrapes, give NaN)."""
    value = scalar(result)
    return value is not None and math.isfinite(value)


@pytest.fixture(scope="module")
def prometheus(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """The shipped prometheus.yml and rules, pointed at the live server, scraping every second."""
    binary = require_tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / path) for path in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "exitserve"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live_server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(url=f"http://127.0.0.1:{port}")
    try:
        wait_until_ok(f"{server.url}/-/ready", timeout_s=60, process=process)
        # The first scrape (before any traffic) gives every counter its zero.
        up = server.wait_for('up{job="exitserve"}', lambda r: scalar(r) == 1.0)
        assert scalar(up) == 1.0, f"Prometheus does not scrape the server: {up}"
        yield server
    finally:
        stop_process(process)
        log.close()


@dataclass
class Traffic:
    exit_layers: list[int]


def send_traffic(server: LiveServer) -> list[int]:
    """Known requests: fast ones, full-depth ones and invalid ones; the exit layers of the replies."""
    exit_layers = []
    for i in range(NUM_FAST + NUM_FULL):
        speed = 1.0 if i < NUM_FAST else 0.0
        body: dict[str, object] = {"inputs": f"message number {i}", "speed": speed, "criterion": "max_prob"}
        if speed == 0.0:  # allows degradation (an idle server runs it as asked): the overload panels' data
            body["overload_max_accuracy_drop"] = 100.0
        status, _, reply = http_json(f"{server.url}/v1/classify", body)
        assert status == 200, reply
        (result,) = reply["results"]
        exit_layers.append(result["exit_layer"])
    for _ in range(NUM_INVALID):
        status, _, reply = http_json(f"{server.url}/v1/classify", {"inputs": "x", "speed": 7})
        assert status == 422, reply
    return exit_layers


@pytest.fixture(scope="module")
def traffic(live_server: LiveServer, prometheus: Prometheus) -> Traffic:
    """The first requests the live server ever gets."""
    return Traffic(exit_layers=send_traffic(live_server))


@pytest.fixture(scope="module")
def more_traffic(live_server: LiveServer, prometheus: Prometheus, traffic: Traffic) -> Traffic:
    """A second wave, once Prometheus has seen the first. Series born with the first requests (one per
    route and status) start at their first sample, so rate() sees only increases after it."""
    num_ok = len(traffic.exit_layers)
    seen = prometheus.wait_for(
        'sum(exitserve_requests_total{route="/v1/classify", status="200"})', lambda r: scalar(r) == num_ok
    )
    assert scalar(seen) == num_ok
    return Traffic(exit_layers=traffic.exit_layers + send_traffic(live_server))


def test_exit_layer_histogram_counts_every_request(prometheus: Prometheus, traffic: Traffic) -> None:
    num_rows = NUM_FAST + NUM_FULL
    result = prometheus.wait_for("sum(exitserve_exit_layer_count)", lambda r: scalar(r) == num_rows)
    assert scalar(result) == num_rows
    # Speed 1 with max_prob exits at the first ramp; speed 0 never exits early.
    assert traffic.exit_layers == [1] * NUM_FAST + [TINY_NUM_LAYERS] * NUM_FULL
    # Each cumulative bucket le=k holds the rows whose reply said exit_layer <= k.
    buckets = {
        float(series["metric"]["le"]): float(series["value"][1])
        for series in prometheus.query("sum by (le) (exitserve_exit_layer_bucket)")
    }
    per_layer = Counter(traffic.exit_layers)
    for layer in range(1, TINY_NUM_LAYERS + 1):
        assert buckets[float(layer)] == sum(n for k, n in per_layer.items() if k <= layer)
    assert buckets[math.inf] == num_rows
    status_200 = prometheus.query('sum(exitserve_requests_total{route="/v1/classify", status="200"})')
    assert scalar(status_200) == num_rows
    assert scalar(prometheus.query('sum(exitserve_requests_total{status="422"})')) == NUM_INVALID


def test_recording_rules_match_the_replies(prometheus: Prometheus, more_traffic: Traffic) -> None:
    # The exit-layer histogram exists (at zero) before any request: its rate covers both waves.
    mean_exit_layer = sum(more_traffic.exit_layers) / len(more_traffic.exit_layers)
    mean = prometheus.wait_for("exitserve:exit_layer:mean_5m", finite)
    assert scalar(mean) == pytest.approx(mean_exit_layer, rel=1e-9)
    saved = prometheus.wait_for("exitserve:layers_saved:ratio_5m", finite)
    assert scalar(saved) == pytest.approx(1 - mean_exit_layer / TINY_NUM_LAYERS, rel=1e-9)
    errors = prometheus.wait_for("exitserve:request_errors:ratio_rate5m", finite)
    assert scalar(errors) == 0.0  # 422s are the client's errors, not the server's
    p99 = prometheus.wait_for("exitserve:request_duration_seconds:p99_5m", finite)
    p99_s = scalar(p99)
    assert p99_s is not None and 0 < p99_s <= 10.0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    # Template variables: label_values(metric, label) is Grafana's; the same question in PromQL.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":  # picks the Prometheus to query; no PromQL
            continue
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        queries.append((f"variable {variable['name']}", f"group by ({match[2]}) ({match[1]})"))
    return queries


def test_dashboard_covers_the_issue() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    assert panels["Exit layer distribution"]["type"] == "heatmap"
    for title in [
        "Request rate",
        "Latency p50 / p95 / p99 (/v1/classify)",
        "Errors by status",
        "Share of layers saved",
        "Batch size (rows per layer step)",
        "Queue depth and in-flight requests",
        "Degraded rows and deadline exits",
        "Effective speed under overload",
        "Predicted accuracy drop of the setting used",
    ]:
        assert panels[title]["targets"], title
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus"
    # No hard-coded datasource uid: every panel queries the Prometheus picked in the $datasource variable.
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    for title in (
        "Early-exit agreement with full depth: live vs calibrated",
        "Default speed",
        "Shadow rows shed",
    ):
        assert panels[title]["targets"], title


def test_every_dashboard_query_returns_data(prometheus: Prometheus, more_traffic: Traffic) -> None:
    def has_number(result: list[dict[str, Any]]) -> bool:
        return any(math.isfinite(float(series["value"][1])) for series in result)

    empty = []
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        if expr in NEEDS_SHADOW_SAMPLES:
            prometheus.query(expr)  # runs (valid PromQL); may hold no series yet
            continue
        if not has_number(prometheus.wait_for(expr, has_number, timeout_s=20.0)):
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_adapter_series_exist_on_the_server(live_server: LiveServer) -> None:
    """The metrics prometheus-adapter turns into the HPA's custom metrics are ones the server exposes."""
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    status, _, exposition = http_json(f"{live_server.url}/metrics")
    assert status == 200
    for rule in values["rules"]["custom"]:
        metric = re.match(r"(\w+)\{", rule["seriesQuery"])
        assert metric, rule["seriesQuery"]
        assert re.search(rf"^{metric[1]}\{{", exposition, re.MULTILINE), metric[1]


def test_scrape_targets_match_the_compose_stack() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert f"EXITSERVE_PORT={port}" in dockerfile
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert urllib.parse.urlparse(datasource["datasources"][0]["url"]).hostname in compose["services"]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).resolve().exists(), volume
