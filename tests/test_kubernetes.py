"""The Kubernetes manifests under deploy/kubernetes/ (issue 15): they cannot run here, so they are checked
twice: against the Kubernetes API schemas (kubernetes-validate, strict: an unknown or misspelt field is
an error), and against the server itself: the environment they set is a valid `advserve serve`
configuration, a server started with it answers their probe paths, their ports agree with that
configuration, the metric they scale on is one the server exports, and the memory limit covers what
docs/workers.md says the configuration can use. The custom resources (KEDA's ScaledObject, KServe's
ClusterServingRuntime and InferenceService) have no schema in kubernetes-validate: their container is
checked against the core Container schema they embed, and their field names against the lists below."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from unittest import mock

import httpx
import kubernetes_validate
import pytest
import yaml
import jsonschema
from referencing import Registry, Resource

from advserve.cli import build_parser
from advserve.config import Settings, env_name, setting_fields
from conftest import ROOT, RunningServer

K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
MIB = 1 << 20
WORKER_MIB, SUPERVISOR_MIB = 700, 128  # docs/workers.md: memory limit = admission + N x 700 MiB + 128 MiB


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def merge_patch(target, patch):
    """Kubernetes' strategic merge for what gpu-patch.yaml uses: maps merge key by key, lists of objects
    with a `name` (containers, env) merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for key, value in patch.items():
            out[key] = merge_patch(target[key], value) if key in target else copy.deepcopy(value)
        return out
    if (isinstance(target, list) and isinstance(patch, list) and patch and all(isinstance(x, dict) and "name" in x
                                                                                for x in target + patch)):
        out, index = [copy.deepcopy(x) for x in target], {x["name"]: i for i, x in enumerate(target)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge_patch(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def deployments() -> dict[str, dict]:
    cpu = by_kind(documents("advserve.yaml"), "Deployment")[0]
    return {"cpu": cpu, "gpu": merge_patch(cpu, yaml.safe_load((K8S / "gpu-patch.yaml").read_text()))}


def container_env(container: dict) -> dict[str, str]:
    """The container's plain `value` variables (a secretKeyRef's value is not in the manifest)."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings `advserve serve` builds with exactly this environment (cli.main's own path)."""
    with mock.patch.dict(os.environ, {k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")} | env,
                         clear=True):
        args = build_parser().parse_args(["serve"])
    values = {f.name: getattr(args, f.name) for f in setting_fields() if hasattr(args, f.name)}
    return Settings(**values, auth_token="").validate()


def quantity_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text).groups()
    return int(number) << {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, None: 0}[unit]


def validate_core(instance: dict, definition: str) -> None:
    """Validate `instance` against one definition of the Kubernetes API (strict schemas), e.g.
    io.k8s.api.core.v1.Container."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    definitions = Resource.from_contents(json.loads((root / "_definitions.json").read_text()))
    registry = Registry().with_resource(definitions.id(), definitions)
    schema = {"$ref": f"{definitions.id()}#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_deployment_variants_are_valid_kubernetes(variant):
    kubernetes_validate.validate(deployments()[variant], KUBERNETES_VERSION, strict=True)


def test_every_core_object_is_valid_kubernetes():
    docs = documents("advserve.yaml")
    assert sorted(doc["kind"] for doc in docs) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                                    "Service", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_an_invalid_field_is_caught():
    """The check can fail: a misspelt probe field is refused by the strict schema."""
    broken = deployments()["cpu"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# the custom resources' fields this project uses, from their CRDs: KEDA 2.x ScaledObject (keda.sh/v1alpha1),
# KServe 0.15+ ClusterServingRuntime (serving.kserve.io/v1alpha1) and InferenceService (v1beta1)
CRD_FIELDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "spec": {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "cooldownPeriod", "pollingInterval",
                 "triggers", "advanced", "fallback", "idleReplicaCount"}},
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): {
        "spec": {"annotations", "supportedModelFormats", "protocolVersions", "containers", "multiModel",
                 "disabled", "grpcDataEndpoint", "httpDataEndpoint", "nodeSelector", "tolerations", "affinity",
                 "volumes", "imagePullSecrets", "labels", "replicas", "workerSpec", "storageHelper"}},
    ("serving.kserve.io/v1beta1", "InferenceService"): {"spec": {"predictor", "transformer", "explainer"}},
}
KEDA_PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                            "authModes", "ignoreNullValues", "unsafeSsl", "customHeaders", "queryParameters"}
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "ports", "env", "args",
                       "resources", "image", "name"}


def test_custom_resources_use_their_crds_fields():
    docs = documents("keda-scaledobject.yaml") + documents("kserve-runtime.yaml")
    for doc in docs:
        known = CRD_FIELDS[(doc["apiVersion"], doc["kind"])]
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        assert set(doc["spec"]) <= known["spec"], (doc["kind"], set(doc["spec"]) - known["spec"])
        validate_core(doc["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployments()["cpu"]["metadata"]["name"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus" and set(trigger["metadata"]) <= KEDA_PROMETHEUS_METADATA
        assert all(isinstance(v, str) for v in trigger["metadata"].values())  # KEDA's metadata is map[string]string
    (runtime,) = by_kind(docs, "ClusterServingRuntime")
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    for container in runtime["spec"]["containers"]:
        validate_core(container, "io.k8s.api.core.v1.Container")
    services = by_kind(docs, "InferenceService")
    assert {s["spec"]["predictor"]["model"]["protocolVersion"] for s in services} == {"v2", "grpc-v2"}
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert set(model) <= KSERVE_MODEL_FIELDS
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
        for port in model.get("ports", []):
            validate_core(port, "io.k8s.api.core.v1.ContainerPort")


def serving_containers() -> dict[str, dict]:
    out = {variant: d["spec"]["template"]["spec"]["containers"][0] for variant, d in deployments().items()}
    (runtime,) = by_kind(documents("kserve-runtime.yaml"), "ClusterServingRuntime")
    out["kserve"] = runtime["spec"]["containers"][0]
    return out


@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_the_environment_is_a_valid_configuration_that_fits_the_memory_limit(variant):
    container = serving_containers()[variant]
    known = {env_name(f.name) for f in setting_fields()} | {"TRITON_CACHE_DIR"}
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names)) and set(names) <= known, set(names) - known
    settings = settings_from(container_env(container))
    ports = {p["containerPort"] for p in container["ports"]}
    assert settings.http_port in ports
    if variant != "kserve":  # KServe gives the container one port; gRPC's is named in the InferenceService
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": settings.http_port,
                                                                             "grpc": settings.grpc_port}
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    assert settings.workers >= 1, "set ADVSERVE_WORKERS: auto counts the node's cores"
    assert limit >= settings.admission_bytes + (settings.workers * WORKER_MIB + SUPERVISOR_MIB) * MIB
    assert container["resources"]["requests"] == container["resources"]["limits"]  # Guaranteed QoS
    if variant == "gpu":
        assert settings.device == "cuda" and settings.workers == 1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_termination_outlasts_the_drain():
    """terminationGracePeriodSeconds covers the preStop pause plus the server's own grace, so the kubelet's
    SIGKILL never cuts a drain short (a request accepted is answered)."""
    for deployment in deployments().values():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        grace = settings_from(container_env(container)).shutdown_grace_s
        assert pod["terminationGracePeriodSeconds"] >= container["lifecycle"]["preStop"]["sleep"]["seconds"] + grace + 5


def test_the_pod_runs_as_the_images_user():
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M).groups()
    context = deployments()["cpu"]["spec"]["template"]["spec"]["securityContext"]
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    for container in serving_containers().values():
        argv = json.loads(entrypoint)[1:] + container.get("args", [])
        assert build_parser().parse_args(argv).command == "serve"


def test_services_select_the_pods_and_name_their_ports():
    docs = documents("advserve.yaml")
    pod = deployments()["cpu"]["spec"]["template"]
    named_ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    for doc in by_kind(docs, "Service") + by_kind(docs, "PodDisruptionBudget"):
        selector = doc["spec"]["selector"].get("matchLabels", doc["spec"]["selector"])
        assert selector.items() <= pod["metadata"]["labels"].items()
    (grpc,) = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [p["targetPort"] for p in grpc["spec"]["ports"]] == ["grpc"]  # headless: per-call balancing
    for service in by_kind(docs, "Service"):
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named_ports


@pytest.fixture(scope="module")
def pod_server():
    """A server started with the CPU pod's environment (its ports and worker count given as flags: free
    loopback ports, one worker on this machine)."""
    running = RunningServer(env=container_env(serving_containers()["cpu"]) | {"ADVSERVE_DEVICE": "cpu"})
    yield running
    running.stop()


def test_the_probes_and_scraped_paths_answer(pod_server):
    container = serving_containers()["cpu"]
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    annotations = deployments()["cpu"]["spec"]["template"]["metadata"]["annotations"]
    paths.add(annotations["prometheus.io/path"])
    (runtime,) = by_kind(documents("kserve-runtime.yaml"), "ClusterServingRuntime")
    paths |= {runtime["spec"]["annotations"]["prometheus.kserve.io/path"], "/v2/health/ready", "/v2/health/live"}
    for path in sorted(paths):
        assert httpx.get(pod_server.url + path, timeout=10).status_code == 200, path
    assert annotations["prometheus.io/port"] == str(settings_from(container_env(container)).http_port)


def test_autoscalers_scale_on_a_metric_the_server_exports(pod_server):
    exported = set(re.findall(r"^# TYPE (\w+) ", httpx.get(pod_server.url + "/metrics", timeout=10).text, re.M))
    (hpa,) = by_kind(documents("advserve.yaml"), "HorizontalPodAutoscaler")
    used = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    (scaled,) = by_kind(documents("keda-scaledobject.yaml"), "ScaledObject")
    for trigger in scaled["spec"]["triggers"]:
        used |= set(re.findall(r"\b(advserve_\w+)\{", trigger["metadata"]["query"]))
    assert used and used <= exported, used - exported
