"""Kubernetes manifests, offline: every kustomization renders, validates strictly and follows the
policy (deploy/check.py); the policy and the custom-resource checks reject what they must."""

from __future__ import annotations

import copy
import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_check():
    spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _load_check()


@lru_cache(maxsize=None)
def _render(kustomization: str) -> tuple:
    return tuple(check.render(kustomization))


def rendered(kustomization: str) -> list[dict]:
    """A fresh deep copy of a rendered kustomization; fails (never skips) without kubectl."""
    try:
        return copy.deepcopy(list(_render(kustomization)))
    except check.KubectlMissingError as exc:
        pytest.fail(str(exc))


def only(objects: list[dict], kind: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def server_container(objects: list[dict]) -> dict:
    return check.container_named(only(objects, "Deployment"), "server")


SERVING_KINDS = ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "PodMonitor",
                 "PrometheusRule", "Service", "Service", "ServiceAccount"]
OVERLAYS = ["overlays/cpu", "overlays/gpu", "overlays/gpu-tp"]


@pytest.mark.parametrize("kustomization, kinds", [
    *[(overlay, SERVING_KINDS) for overlay in OVERLAYS],
    ("engine-build", ["Job"]),
    ("storage", ["PersistentVolumeClaim", "PersistentVolumeClaim"]),
    ("gateway", ["Deployment", "NetworkPolicy", "PodMonitor", "Service"]),
])
def test_every_kustomization_renders(kustomization, kinds):
    objects = rendered(kustomization)
    assert sorted(o["kind"] for o in objects) == kinds
    assert {o["metadata"].get("namespace") for o in objects} == {"reward"}


@pytest.mark.parametrize("kustomization", check.KUSTOMIZATIONS)
def test_rendered_objects_pass_strict_schema_crd_and_policy_checks(kustomization):
    objects = rendered(kustomization)
    assert check.validate_schema(objects) == []
    assert check.check_custom_resources(objects) == []
    assert check.check_policy(objects) == []


def test_strict_validation_rejects_an_unknown_field():
    objects = rendered("overlays/cpu")
    only(objects, "Deployment")["spec"]["replica"] = 2  # a typo of `replicas`
    errors = check.validate_schema(objects, versions=("1.37",))
    assert len(errors) == 1 and "Deployment/reward-server" in errors[0] and "replica" in errors[0]


def test_kubectl_missing_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(check.KubectlMissingError, match="kubectl is not installed.*make setup"):
        check.render("overlays/cpu")


# -- the policy rejects each thing it exists to reject -------------------------------------------


def _deprecated_hpa(objects):
    only(objects, "HorizontalPodAutoscaler")["apiVersion"] = "autoscaling/v2beta2"


def _deprecated_pdb(objects):
    only(objects, "PodDisruptionBudget")["apiVersion"] = "policy/v1beta1"


def _no_liveness(objects):
    del server_container(objects)["livenessProbe"]


def _no_startup(objects):
    del server_container(objects)["startupProbe"]


def _http_liveness(objects):
    server_container(objects)["livenessProbe"] = {"httpGet": {"path": "/v2/health/live", "port": "http"},
                                                  "timeoutSeconds": 5}


def _gpu_requests_below_limits(objects):
    server_container(objects)["resources"]["requests"]["nvidia.com/gpu"] = 1


def _gpu_limit_missing(objects):
    del server_container(objects)["resources"]["limits"]["nvidia.com/gpu"]


def _root_user(objects):
    only(objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0


def _root_allowed(objects):
    del only(objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def _writable_root(objects):
    server_container(objects)["securityContext"]["readOnlyRootFilesystem"] = False


def _capabilities_kept(objects):
    server_container(objects)["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}


def _latest_image(objects):
    server_container(objects)["image"] = "registry.example.com/reward-server-gpu:latest"


def _untagged_image(objects):
    server_container(objects)["image"] = "registry.example.com:5000/reward-server-gpu"


def _short_grace(objects):
    only(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 45


def _default_shm(objects):
    mounts = server_container(objects)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/dev/shm"]


@pytest.mark.parametrize("mutate, message", [
    (_deprecated_hpa, "apiVersion autoscaling/v2beta2 is deprecated or removed; use autoscaling/v2"),
    (_deprecated_pdb, "apiVersion policy/v1beta1 is deprecated or removed; use policy/v1"),
    (_no_liveness, "container server: no livenessProbe"),
    (_no_startup, "container server: no startupProbe"),
    (_http_liveness, "livenessProbe does not score through reward_server.probe"),
    (_gpu_requests_below_limits, "GPU requests (1) != limits (4)"),
    (_gpu_limit_missing, "GPU requests (4) != limits (None)"),
    (_root_user, "runs as root (runAsUser 0)"),
    (_root_allowed, "runAsNonRoot is not true"),
    (_writable_root, "root filesystem is not read-only"),
    (_capabilities_kept, "capabilities do not drop ALL"),
    (_latest_image, "is not pinned"),
    (_untagged_image, "is not pinned"),
    (_short_grace, "terminationGracePeriodSeconds 45 <= 50 s"),
    (_default_shm, "/dev/shm is not a memory emptyDir"),
])
def test_policy_rejects(mutate, message):
    objects = rendered("overlays/gpu-tp")
    mutate(objects)
    errors = check.check_policy(objects)
    assert len(errors) == 1, errors
    assert message in errors[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda o: only(o, "PodMonitor")["spec"].pop("selector"), "PodMonitor/reward-server: spec.selector is required"),
    (lambda o: only(o, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(port="prometheus"),
     "endpoint port 'prometheus' is not a container port"),
    (lambda o: only(o, "PrometheusRule")["spec"]["groups"][0]["rules"][0].pop("expr"), "has no expr"),
    (lambda o: only(o, "PrometheusRule")["spec"]["groups"][0]["rules"].pop(0),
     "no PrometheusRule records triton:queue_compute:ratio"),
    (lambda o: only(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
        {"app.kubernetes.io/name": "other"}), "PodDisruptionBudget/reward-server: selector matches no pod"),
    (lambda o: only(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="other"),
     "scaleTargetRef names no Deployment"),
])
def test_custom_resource_and_reference_checks_reject(mutate, message):
    objects = rendered("overlays/cpu")
    mutate(objects)
    errors = check.check_custom_resources(objects)
    assert len(errors) == 1, errors
    assert message in errors[0]


# -- what the overlays promise -------------------------------------------------------------------


def _arg(container: dict, flag: str) -> str:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "=")]
    assert len(values) == 1, f"{flag} given {len(values)} times in {container['args']}"
    return values[0]


@pytest.mark.parametrize("overlay, gpus", [("overlays/cpu", None), ("overlays/gpu", "1"), ("overlays/gpu-tp", "4")])
def test_each_overlay_serves_on_all_interfaces_with_its_gpu_count(overlay, gpus):
    container = server_container(rendered(overlay))
    assert container["command"] == ["reward-server", "serve"]
    assert _arg(container, "--host") == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert (_arg(container, "--grpc-port"), _arg(container, "--http-port"), _arg(container, "--metrics-port")) == \
        ("8001", "8000", "8002")
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (int(gpus) if gpus else None)


def test_tensor_parallel_overlay_serves_the_engine_the_build_job_writes():
    server = server_container(rendered("overlays/gpu-tp"))
    job = only(rendered("engine-build"), "Job")
    build = check.container_named(job, "build")
    engine_dir = _arg(server, "--engine-dir")
    # Keyed /engines/<model>/<gpu product>/tp<N>: the same path, GPU product and tp everywhere.
    assert engine_dir == _arg(build, "--output")
    _, _, model, gpu_product, tp_dir = engine_dir.split("/")
    tp = int(tp_dir.removeprefix("tp"))
    assert tp == int(_arg(build, "--tp")) == int(_arg(server, "--world-size"))
    assert tp == server["resources"]["limits"]["nvidia.com/gpu"] == build["resources"]["limits"]["nvidia.com/gpu"]
    assert _arg(build, "--checkpoint") == f"/models/{model}"
    server_pod = only(rendered("overlays/gpu-tp"), "Deployment")["spec"]["template"]["spec"]
    for pod in (server_pod, job["spec"]["template"]["spec"]):
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0] == {"key": "nvidia.com/gpu.product", "operator": "In",
                                                   "values": [gpu_product]}
    assert _arg(server, "--engine") == "tensorrt_llm"
    # Engines are served read-only; only the build Job writes them.
    assert {m["mountPath"]: m.get("readOnly", False) for m in server["volumeMounts"]}["/engines"] is True
    assert {m["mountPath"]: m.get("readOnly", False) for m in build["volumeMounts"]}["/engines"] is False
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_services_expose_grpc_as_h2c_and_a_headless_service_for_client_side_routing():
    services = {o["metadata"]["name"]: o["spec"] for o in rendered("overlays/gpu") if o["kind"] == "Service"}
    assert services["reward-server-headless"]["clusterIP"] == "None"
    assert services["reward-server-headless"]["publishNotReadyAddresses"] is False
    grpc = [p for p in services["reward-server"]["ports"] if p["name"] == "grpc"][0]
    assert (grpc["port"], grpc["appProtocol"]) == (8001, "kubernetes.io/h2c")
    assert {p["name"] for p in services["reward-server"]["ports"]} == {"grpc", "http", "metrics"}


def test_network_policy_admits_trainers_to_inference_and_monitoring_to_metrics_only():
    policy = only(rendered("overlays/cpu"), "NetworkPolicy")["spec"]
    rules = {(rule["from"][0].get("namespaceSelector") or rule["from"][0]["podSelector"])["matchLabels"].popitem()[1]:
             sorted(p["port"] for p in rule["ports"]) for rule in policy["ingress"]}
    assert rules == {"rl-training": ["grpc", "http"], "monitoring": ["metrics"], "reward-gateway": ["grpc"]}
    assert policy["policyTypes"] == ["Ingress"]


def test_autoscaler_scales_on_the_recorded_queue_compute_ratio():
    objects = rendered("overlays/cpu")
    hpa = only(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "triton_queue_compute_ratio"},
                                                         "target": {"type": "AverageValue", "averageValue": "1000m"}}}]
    rules = {r.get("record"): r["expr"] for g in only(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    expr = " ".join(rules["triton:queue_compute:ratio"].split())
    assert "rate(nv_inference_queue_duration_us" in expr and "clamp_min(" in expr
    # the PyTorch engine keeps its own queue: its own counters stand in for Triton's
    assert "rate(reward_engine_queue_duration_us_total" in expr and "rate(reward_engine_compute_duration_us_total" in expr
    assert "nv_inference_compute_infer_duration_us" in expr
    assert only(rendered("overlays/gpu-tp"), "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 4


def test_grace_period_outlasts_the_launchers_stop_sequence():
    from reward_server.supervisor.options import ServeOptions

    # deploy/check.py's budget must follow the launcher's own exit timeout.
    assert ServeOptions().exit_timeout_s == check.SERVER_EXIT_TIMEOUT_S
    for overlay in OVERLAYS:
        pod = only(rendered(overlay), "Deployment")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 60


def test_gateway_routes_through_the_servers_headless_service_and_is_let_in():
    """The gateway's SDK targets every ready server pod (dns:/// + the headless Service, so each prompt
    group goes to one replica); the servers' policy admits the gateway's pods on gRPC; its grace
    outlasts its graceful shutdown."""
    from reward_server.gateway.app import GRACEFUL_SHUTDOWN_S

    gateway = rendered("gateway")
    deployment = only(gateway, "Deployment")
    container = check.container_named(deployment, "gateway")
    assert container["command"] == ["reward-server", "gateway"]
    headless = [o for o in rendered("overlays/cpu") if o["metadata"]["name"] == "reward-server-headless"][0]
    url = f"--url=dns:///{headless['metadata']['name']}.{headless['metadata']['namespace']}.svc.cluster.local:8001"
    assert url in container["args"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    server_policy = only(rendered("overlays/cpu"), "NetworkPolicy")["spec"]
    assert any(check._selects(rule["from"][0].get("podSelector", {}), labels) for rule in server_policy["ingress"])
    assert check.GATEWAY_GRACEFUL_S == GRACEFUL_SHUTDOWN_S
    assert check.role(deployment) == "gateway" and check.role(only(rendered("overlays/cpu"), "Deployment")) == "server"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(livenessProbe={"exec": {"command": ["python3", "-m", "reward_server.probe"]}}),
     "must be GET /health/live"),
    (lambda c: c.pop("readinessProbe"), "no readinessProbe"),
])
def test_gateway_policy_rejects(mutate, message):
    objects = rendered("gateway")
    mutate(check.container_named(only(objects, "Deployment"), "gateway"))
    assert any(message in error for error in check.check_policy(objects)), check.check_policy(objects)
