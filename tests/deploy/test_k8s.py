"""deploy/k8s: each overlay renders with `kubectl kustomize`; kubernetes-validate (offline schemas,
strict: unknown fields are errors) accepts every built-in object; CRD objects (ServiceMonitor), which
it has no schema for, are checked here field by field; and the objects agree with each other."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, missing, require_tool

K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
# Oldest and newest Kubernetes release the manifests are checked against.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_builtin_objects_validate_strictly(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed")
    overlay, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Job",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} on {version}: {e.message}")


def test_strict_validation_rejects_unknown_fields() -> None:
    """The validator really is strict (a typo in a Deployment would be caught)."""
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed")
    deployment = by_kind(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_service_monitor(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """No schema for this CRD offline: its required fields and references are checked here."""
    _, objects = rendered
    monitor = by_kind(objects, "ServiceMonitor")
    service = by_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == "exitserve"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the chart's default selector
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_objects_agree(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    deployment = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    settings = by_kind(objects, "ConfigMap")
    # Every selector picks the server pods, and the model-building Job's pods are not among them.
    job_labels = by_kind(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    for selector in [
        deployment["spec"]["selector"]["matchLabels"],
        by_kind(objects, "Service")["spec"]["selector"],
        by_kind(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]:
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= job_labels.items()
    assert container["envFrom"][0]["configMapRef"]["name"] == settings["metadata"]["name"]
    assert all(key.startswith("EXITSERVE_") for key in settings["data"])
    # The API key comes from a Secret, never the ConfigMap; the model version is pinned.
    assert "EXITSERVE_API_KEY" not in settings["data"]
    (api_key,) = container["env"]
    assert api_key["name"] == "EXITSERVE_API_KEY" and api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert settings["data"]["EXITSERVE_MODEL_VERSION"]
    # A node drain (PDB maxUnavailable 1) always leaves a pod serving: at least 2 replicas.
    assert by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert by_kind(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    # Probes: the server's health routes, on the named port.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == int(settings["data"]["EXITSERVE_PORT"])
    # SIGTERM comes after the preStop sleep; the drain must end before the grace period does.
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = float(settings["data"]["EXITSERVE_DRAIN_TIMEOUT_S"])
    assert pre_stop_s + drain_s < pod["spec"]["terminationGracePeriodSeconds"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # owned by the HPA
    # The image runs as uid 10001 (Dockerfile USER); the pod insists on non-root.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    # HPA: the Deployment, the adapter's custom metric, CPU as the fallback.
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pods_metric, cpu_metric = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    exposed = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert pods_metric["type"] == "Pods" and pods_metric["pods"]["metric"]["name"] in exposed
    assert cpu_metric["type"] == "Resource" and cpu_metric["resource"]["name"] == "cpu"
    assert "cpu" in container["resources"]["requests"]  # CPU utilisation needs a request
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and settings["data"]["EXITSERVE_DEVICE"] == "cuda"
        assert container["image"].endswith("-cuda")
    else:
        assert gpus is None and "EXITSERVE_DEVICE" not in settings["data"]
        assert not container["image"].endswith("-cuda")


def _generator() -> Any:
    import importlib.util

    path = DEPLOY.parent / "scripts" / "generate_k8s_monitoring.py"
    spec = importlib.util.spec_from_file_location("generate_k8s_monitoring", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_monitoring_manifests_are_generated_from_the_compose_files() -> None:
    """The PrometheusRule holds exactly the rule groups the Compose stack's Prometheus loads (its
    prometheus.yml rule_files), the dashboard ConfigMap the dashboard Compose's Grafana provisions; the
    committed files are what the generator writes now."""
    generator = _generator()
    for name, build in generator.GENERATED.items():
        assert (K8S / "monitoring" / name).read_text() == build(), f"regenerate {name}"
    result = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(K8S / "monitoring")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    rule = by_kind(objects, "PrometheusRule")
    compose_prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    loaded = []
    for path in compose_prometheus["rule_files"]:
        loaded += yaml.safe_load((DEPLOY / "prometheus" / path).read_text())["groups"]
    assert rule["spec"]["groups"] == loaded
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard = by_kind(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert (
        dashboard["data"]["exitserve.json"]
        == (DEPLOY / "grafana" / "dashboards" / "exitserve.json").read_text()
    )
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed")
    kubernetes_validate.validate(dashboard, KUBERNETES_VERSIONS[-1], strict=True)
