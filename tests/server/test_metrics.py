"""server/metrics.py: the observer's numbers, the exposition, and metrics after real HTTP requests."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Registry, ServerMetrics
from tests.server.api.conftest import serve

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
# exactly the names in docs/TEAM_NOTES.md (families; counters expose <name>_total)
METRIC_FAMILIES = {
    "exitserve_requests": "counter",
    "exitserve_request_duration_seconds": "histogram",
    "exitserve_queue_wait_seconds": "histogram",
    "exitserve_batch_size": "histogram",
    "exitserve_exit_layer": "histogram",
    "exitserve_layers_run": "counter",
    "exitserve_layers_saved": "counter",
    "exitserve_rows_per_layer": "counter",
    "exitserve_rows": "counter",
    "exitserve_queue_depth": "gauge",
    "exitserve_inflight_requests": "gauge",
    "exitserve_batch_failures": "counter",
    "exitserve_engine_restarts": "counter",
    "exitserve_ready": "gauge",
    # the live accuracy guard (server/engine/guard.py)
    "exitserve_guard_samples": "counter",
    "exitserve_guard_dropped": "counter",
    "exitserve_guard_expected_agreement": "gauge",
    "exitserve_default_speed": "gauge",
    # admission by time (server/engine/scheduler.py)
    "exitserve_admission_refused": "counter",
    "exitserve_deadline_dropped_rows": "counter",
    "exitserve_predicted_backlog_seconds": "gauge",
    # the trust figure, anytime answers, degradation under overload
    "exitserve_guard_trust_samples": "counter",
    "exitserve_trust_stated_agreement": "gauge",
    "exitserve_deadline_exit_rows": "counter",
    "exitserve_degraded_rows": "counter",
    "exitserve_effective_speed": "gauge",
    "exitserve_predicted_accuracy_drop_points": "gauge",
    # deployment: rows for the HPA, the served version for skew alerts
    "exitserve_rows_in_system": "gauge",
    "exitserve_model_info": "gauge",
}


def _families(metrics: ServerMetrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.exposition().decode())}


def test_exactly_the_agreed_metric_names() -> None:
    metrics = ServerMetrics("m", Registry())
    metrics.bind_model(4)
    assert _families(metrics) == METRIC_FAMILIES


def test_observer_numbers() -> None:
    registry = Registry()
    metrics = ServerMetrics("m", registry)
    metrics.bind_model(3)
    for layer, num_rows in [(1, 5), (2, 3), (3, 1)]:
        metrics.layer_step(layer, num_rows, num_rows * 10)
    for exit_layer in [1, 1, 2, 2, 3]:
        metrics.row_exited(exit_layer, 3)
    metrics.queue_waits([0.002])
    metrics.queue_depth(7)
    metrics.inflight(2, 9)
    metrics.batch_failed(4)
    metrics.engine_restarted()
    metrics.guard_result("0.3", True)
    metrics.guard_result("0.3", True)
    metrics.guard_result("0.3", False)
    metrics.guard_dropped(5)
    metrics.set_guard_expectation({"0.3": 0.985})
    metrics.default_speed_changed(0.2)
    m = {"model": "m"}
    value = registry.get_sample_value
    assert value("exitserve_layers_run_total", m) == 9
    assert value("exitserve_layers_saved_total", m) == 2 + 2 + 1 + 1 + 0
    assert value("exitserve_rows_total", m) == 5
    assert [value("exitserve_rows_per_layer_total", {**m, "layer": str(k)}) for k in (1, 2, 3)] == [5, 3, 1]
    assert value("exitserve_batch_size_count", m) == 3
    assert value("exitserve_batch_size_bucket", {**m, "le": "4.0"}) == 2  # the steps of 1 and 3 rows
    assert value("exitserve_exit_layer_count", m) == 5
    assert value("exitserve_exit_layer_sum", m) == 9
    assert [
        value("exitserve_exit_layer_bucket", {**m, "le": le}) for le in ("1.0", "2.0", "3.0", "+Inf")
    ] == [
        2,
        4,
        5,
        5,
    ]
    assert value("exitserve_queue_wait_seconds_count", m) == 1
    assert value("exitserve_queue_depth", m) == 7
    assert value("exitserve_inflight_requests", m) == 2
    assert value("exitserve_batch_failures_total", m) == 1
    assert value("exitserve_engine_restarts_total", m) == 1
    assert value("exitserve_guard_samples_total", {**m, "bucket": "0.3", "agreed": "true"}) == 2
    assert value("exitserve_guard_samples_total", {**m, "bucket": "0.3", "agreed": "false"}) == 1
    assert value("exitserve_guard_dropped_total", m) == 5
    assert value("exitserve_guard_expected_agreement", {**m, "bucket": "0.3"}) == 0.985
    assert value("exitserve_default_speed", m) == 0.2


_BATCHED_VS_PLAIN = """
import json, sys
from prometheus_client import CollectorRegistry, Histogram, multiprocess
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server.metrics import observe_all, observe_repeated
registry = CollectorRegistry()
buckets = (0.001, 0.01, 0.1, 1.0, 2.0, 3.0)
plain = Histogram("plain", "h", ["model"], buckets=buckets, registry=registry).labels("m")
batched = Histogram("batched", "h", ["model"], buckets=buckets, registry=registry).labels("m")
waits = [0.0005, 0.001, 0.0011, 0.05, 0.05, 0.5, 2.5, 7.0, 0.0]  # on a bound, between, past the last
for value in waits:
    plain.observe(value)
observe_all(batched, waits)
observe_all(batched, [])
for layer, count in [(1, 5), (3, 2), (2, 0), (3, 1)]:
    for _ in range(count):
        plain.observe(float(layer))
    observe_repeated(batched, float(layer), count)
if sys.argv[1] == "mp":
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
samples = {}
for family in text_string_to_metric_families(generate_latest(registry).decode()):
    for sample in family.samples:
        if family.name in ("plain", "batched"):
            key = sample.name.replace(family.name, "h") + json.dumps(sorted(sample.labels.items()))
            samples.setdefault(family.name, {})[key] = sample.value
print(json.dumps(samples))
"""


@pytest.mark.parametrize("mode", ["single", "mp"])
def test_batched_observes_record_what_plain_observes_do(mode: str, tmp_path: Path) -> None:
    """``observe_all`` / ``observe_repeated`` (the engine's per-step reports) write the samples that one
    ``observe`` per value writes, in both of prometheus_client's value modes (chosen at its import:
    hence a fresh interpreter each)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if mode == "mp":
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", _BATCHED_VS_PLAIN, mode], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout)
    assert samples["plain"] == samples["batched"]
    assert samples["plain"]['h_count[["model", "m"]]'] == 9 + 8


def test_exit_layer_buckets_are_the_layers() -> None:
    metrics = ServerMetrics("m", Registry())
    assert "exitserve_exit_layer" not in _families(metrics)  # created once the model is known
    metrics.bind_model(6)
    buckets = [
        sample.labels["le"]
        for family in text_string_to_metric_families(metrics.exposition().decode())
        if family.name == "exitserve_exit_layer"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    ]
    assert buckets == ["1.0", "2.0", "3.0", "4.0", "5.0", "6.0", "+Inf"]
    metrics.bind_model(6)  # binding again to the same model is harmless
    with pytest.raises(ValueError, match="6 layers"):
        metrics.bind_model(12)


def test_registries_are_separate_and_never_global() -> None:
    from prometheus_client import REGISTRY

    a, b = ServerMetrics("m", Registry()), ServerMetrics("m", Registry())
    a.bind_model(2)
    b.bind_model(2)
    a.row_exited(1, 2)
    assert a.registry.get_sample_value("exitserve_rows_total", {"model": "m"}) == 1
    assert b.registry.get_sample_value("exitserve_rows_total", {"model": "m"}) == 0
    assert REGISTRY.get_sample_value("exitserve_rows_total", {"model": "m"}) is None


def test_only_metrics_module_imports_prometheus_client() -> None:
    importers = []
    for folder in ("server", "model_store", "loadtest"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                if any(name.split(".")[0] == "prometheus_client" for name in names):
                    importers.append(str(path.relative_to(REPO)))
    assert sorted(set(importers)) == ["server/metrics.py"]


async def test_metrics_after_requests() -> None:
    texts = ["hi", "free money now", "a b c d e f"]  # the fake engine exits at 1, 3, 4
    async with serve() as s:
        assert (await s.client.post("/v1/classify", json={"inputs": texts})).status_code == 200
        assert (
            await s.client.post("/v1/classify", json={"inputs": "one two", "max_layers": 1})
        ).status_code == 200
        assert (await s.client.post("/v1/classify", json={"inputs": ""})).status_code == 422
        assert (await s.client.get("/no/such/path")).status_code == 404
        infer = {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x y"]}]}
        assert (await s.client.post("/v2/models/fake/infer", json=infer)).status_code == 200
        response = await s.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted({"model": "fake", **labels}.items())))]

        # exit layers returned: 1, 3, 4, then 1 (max_layers=1), then 2 (v2 infer)
        assert value("exitserve_exit_layer_count") == 5
        assert value("exitserve_exit_layer_sum") == 1 + 3 + 4 + 1 + 2
        assert [value("exitserve_exit_layer_bucket", le=f"{k}.0") for k in (1, 2, 3, 4)] == [2, 3, 4, 5]
        assert value("exitserve_rows_total") == 5
        assert value("exitserve_layers_saved_total") == 3 + 1 + 0 + 3 + 2
        assert value("exitserve_requests_total", route="/v1/classify", status="200") == 2
        assert value("exitserve_requests_total", route="/v1/classify", status="422") == 1
        assert value("exitserve_requests_total", route="unmatched", status="404") == 1
        assert value("exitserve_requests_total", route="/v2/models/{name}/infer", status="200") == 1
        assert value("exitserve_request_duration_seconds_count", route="/v1/classify", status="200") == 2
        assert value("exitserve_request_duration_seconds_count", route="/v1/classify", status="422") == 1
        assert value("exitserve_ready") == 1
        assert value("exitserve_default_speed") == 0.25  # the model's default, set at start-up
        s.app.state.exitserve.begin_drain()
        assert (
            s.app.state.exitserve.metrics.registry.get_sample_value("exitserve_ready", {"model": "fake"}) == 0
        )
