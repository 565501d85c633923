"""The Kubernetes and KServe manifests, rendered by a real kustomize and checked offline:
every object against the Kubernetes schemas (kubernetes-validate, strict) or its custom
resource's own schema, and the probes, ports, grace period and drain settings against each
other and against the server's settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sluice.metrics import Metrics
from sluice.settings import Settings, load_settings
from sluice_client.names import LIVENESS_SERVICE
from tests.deploy.manifests import (
    KUBERNETES,
    RENDERED,
    REPO,
    Object,
    containers,
    crd_schema,
    objects,
    one,
    port_named,
    render,
)

#: The oldest Kubernetes the manifests are for (the preStop sleep action is on by default
#: from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CPU, GPU, MONITORED, KSERVE = RENDERED
SERVER_OVERLAYS = (CPU, GPU, MONITORED)


# -- schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", RENDERED)
def test_every_rendered_object_is_valid_for_kubernetes(path: str) -> None:
    for obj in render(path):
        schema = crd_schema(obj["apiVersion"], obj["kind"])
        where = f"{path}: {obj['kind']} {obj['metadata']['name']}"
        if schema is not None:
            errors = list(jsonschema.Draft202012Validator(schema).iter_errors(obj))
            assert not errors, f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
            )
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} (Kubernetes {version}): {exc}")


def test_the_schema_checks_catch_a_wrong_field() -> None:
    deployment = one(CPU, "Deployment", "sluice")
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    broken = _replace(deployment, probe, {**probe, "grpcc": probe["grpc"]})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    runtime = one(KSERVE, "ClusterServingRuntime")
    schema = crd_schema(runtime["apiVersion"], runtime["kind"])
    assert schema is not None
    wrong = {**runtime, "spec": {**runtime["spec"], "protocolVersion": ["grpc-v2"]}}
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(wrong))


def _replace(obj: Any, old: Any, new: Any) -> Any:
    if obj is old:
        return new
    if isinstance(obj, dict):
        return {k: _replace(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace(v, old, new) for v in obj]
    return obj


# -- the server's Deployment -------------------------------------------------------------


def settings_of(path: str) -> Settings:
    """The settings a pod of ``path`` runs with: its ConfigMap's file, as the server reads
    it (the environment the Deployment sets included)."""
    deployment = one(path, "Deployment", "sluice")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_path = Path(env["SLUICE_CONFIG"])
    mount = _mount_of(deployment, container, config_path)
    configmap = one(path, "ConfigMap", mount["configMap"]["name"])
    text = configmap["data"][config_path.name]
    return Settings.model_validate(yaml.safe_load(text))


def _mount_of(deployment: Object, container: Object, path: Path) -> Object:
    """The volume mounted at ``path``'s folder."""
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    name = mounts[str(path.parent)]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == name)


@pytest.mark.parametrize("path", SERVER_OVERLAYS)
def test_probes_ask_the_health_port_the_right_questions(path: str) -> None:
    settings = settings_of(path)
    container = one(path, "Deployment", "sluice")["spec"]["template"]["spec"]["containers"][0]
    assert settings.tls.enabled and settings.health_port is not None, (
        "with TLS on the gRPC port, the kubelet's gRPC probes need the plaintext health port"
    )
    assert port_named(container, "grpc") == settings.grpc_port
    assert port_named(container, "metrics") == settings.metrics_port
    assert port_named(container, "health") == settings.health_port
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["grpc"]["port"] == settings.health_port
    assert probes["startupProbe"]["grpc"]["service"] == ""
    assert probes["readinessProbe"]["grpc"]["service"] == ""
    assert probes["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, (
        "the startup probe gives model loading at least five minutes"
    )


@pytest.mark.parametrize("path", SERVER_OVERLAYS)
def test_the_grace_period_covers_the_pause_and_the_whole_drain(path: str) -> None:
    settings = settings_of(path)
    pod = one(path, "Deployment", "sluice")["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause > 0
    drain = settings.drain_grace_s + settings.drain_unload_s
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    # The drain in the ConfigMap is the server's default drain: one number to reason about.
    defaults = Settings()
    assert (settings.drain_grace_s, settings.drain_unload_s) == (
        defaults.drain_grace_s,
        defaults.drain_unload_s,
    )
    assert settings.max_connection_age_s is not None
    assert settings.max_connection_age_grace_s <= settings.drain_grace_s


@pytest.mark.parametrize("path", SERVER_OVERLAYS)
def test_the_pod_runs_locked_down_with_its_secrets_mounted(path: str) -> None:
    settings = settings_of(path)
    deployment = one(path, "Deployment", "sluice")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for workload in objects(path, "Deployment"):
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    container = pod["containers"][0]
    assert settings.tls.cert_file is not None and settings.tls.key_file is not None
    tls = _mount_of(deployment, container, settings.tls.cert_file)
    assert tls == _mount_of(deployment, container, settings.tls.key_file)
    assert tls["secret"]["secretName"] == "sluice-tls"
    assert {settings.tls.cert_file.name, settings.tls.key_file.name} == {"tls.crt", "tls.key"}
    token = next(e for e in container["env"] if e["name"] == "SLUICE_ADMIN__TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "sluice-admin", "key": "token"}
    # Writable: /tmp only; the model repository is read-only, so shared state is in Redis.
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable == ["/tmp"]
    assert settings.model_repository is not None
    assert _mount_of(deployment, container, settings.model_repository / "x")["name"] == "models"
    assert settings.lifecycle.redis_url == settings.breaker.redis_url
    redis = one(path, "Service", "sluice-redis")
    assert (
        settings.lifecycle.redis_url
        == f"redis://sluice-redis:{redis['spec']['ports'][0]['port']}/0"
    )


@pytest.mark.parametrize("path", SERVER_OVERLAYS)
def test_services_name_their_grpc_ports_for_meshes_and_select_the_pods(path: str) -> None:
    deployment = one(path, "Deployment", "sluice")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    headless, cluster_ip = one(path, "Service", "sluice-headless"), one(path, "Service", "sluice")
    assert headless["spec"]["clusterIP"] == "None"
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    for service in (headless, cluster_ip):
        assert service["spec"]["selector"].items() <= labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"].startswith("grpc"))
        assert grpc_port["appProtocol"] == "grpc"
        assert grpc_port["targetPort"] == "grpc" and port_named(container, "grpc") > 0
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("path", SERVER_OVERLAYS)
def test_autoscaling_follows_queue_time_and_disruptions_keep_replicas(path: str) -> None:
    deployment = one(path, "Deployment", "sluice")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one(path, "HorizontalPodAutoscaler", "sluice")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sluice",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule(metric["pods"]["metric"]["name"])
    exported = {m.name for m in Metrics().registry.collect()}
    series = set(re.findall(r"sluice_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert series == {"sluice_queue_duration_seconds_sum", "sluice_queue_duration_seconds_count"}
    assert "sluice_queue_duration_seconds" in exported
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pdb = one(path, "PodDisruptionBudget", "sluice")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "a rolling update never drops below the replicas"


def adapter_rule(metric: str) -> dict[str, Any]:
    """The prometheus-adapter rule that serves ``metric``."""
    config = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "config.yaml").read_text())
    rules = [r for r in config["rules"] if r["name"]["as"] == metric]
    assert len(rules) == 1, f"no prometheus-adapter rule serves {metric}"
    rule: dict[str, Any] = rules[0]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert re.fullmatch(rule["name"]["matches"], "sluice_queue_duration_seconds_count")
    return rule


def test_the_gpu_overlay_asks_for_a_gpu_and_the_cuda_image() -> None:
    def server(path: str) -> Object:
        return one(path, "Deployment", "sluice")["spec"]["template"]["spec"]["containers"][0]

    gpu, cpu = server(GPU), server(CPU)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].endswith(":cuda") and cpu["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_the_servicemonitor_scrapes_one_service_on_its_metrics_port() -> None:
    monitor = one(MONITORED, "ServiceMonitor", "sluice")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    services = objects(MONITORED, "Service")
    scraped = [s for s in services if wanted <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["sluice"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    assert not objects(CPU, "ServiceMonitor"), "the ServiceMonitor is optional"


# -- KServe -------------------------------------------------------------------------------


def test_the_kserve_runtime_serves_grpc_v2_for_onnx_pytorch_and_tensorrt() -> None:
    runtime = one(KSERVE, "ClusterServingRuntime", "sluice")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"onnx", "pytorch", "tensorrt"}
    assert all(f["autoSelect"] is True for f in formats.values())
    (container,) = spec["containers"]
    args = container["args"]
    assert args[0] == "serve"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--model-repository"] == "/mnt/models"
    (port,) = container["ports"]
    assert port["name"] == "h2c", "KServe sends gRPC to the port named h2c"
    assert port["containerPort"] == int(flags["--grpc-port"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = load_settings(
        None, host=flags["--host"], grpc_port=int(flags["--grpc-port"]), **_env_settings(env)
    )
    assert container["readinessProbe"]["grpc"] == {"port": settings.grpc_port, "service": ""}
    assert container["livenessProbe"]["grpc"] == {
        "port": settings.grpc_port,
        "service": LIVENESS_SERVICE,
    }
    service = one(KSERVE, "InferenceService", "mlp")
    predictor = service["spec"]["predictor"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = settings.drain_grace_s + settings.drain_unload_s
    assert predictor["terminationGracePeriodSeconds"] > pause + drain
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["protocolVersion"] in spec["protocolVersions"]
    assert predictor["model"]["modelFormat"]["name"] in formats


def _env_settings(env: dict[str, str | None]) -> dict[str, Any]:
    """The ``SLUICE_*`` variables of a container as settings overrides."""
    found: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("SLUICE_") or value is None:
            continue
        path = name.removeprefix("SLUICE_").lower().split("__")
        section = found
        for part in path[:-1]:
            section = section.setdefault(part, {})
        section[path[-1]] = value
    return found


# -- README -------------------------------------------------------------------------------


def test_readme_renders_exactly_what_the_tests_render() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deploy on Kubernetes / KServe", 1)[1].split("\n## ", 1)[0]
    rendered = re.findall(r"^kubectl kustomize (\S+)", section, flags=re.MULTILINE)
    assert sorted(set(rendered)) == sorted(RENDERED)
    applied = re.findall(r"^kubectl apply -k (\S+)", section, flags=re.MULTILINE)
    assert set(applied) <= set(RENDERED) and applied
