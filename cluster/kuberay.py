"""``python -m cluster.kuberay``: the Kubernetes manifests of a Serve config, generated from it.

One source of truth: the KubeRay ``RayService`` embeds the Serve config file itself as
``serveConfigV2``; only the network binding changes (``http_options.host`` becomes ``0.0.0.0``
and ``proxy_location`` becomes ``EveryNode``, since inside a pod ``127.0.0.1`` reaches nobody).
Around it the command writes what the operator needs to run it:

* a head group that runs no replicas (``num-cpus: 0``: the controller and the proxy, nothing that
  competes with them), a CPU worker group and, when a deployment asks for GPUs, a GPU worker group.
  Each group's size comes from the config: ``maxReplicas`` is the number of workers that hold
  every deployment at its ``max_replicas``, ``minReplicas`` those that hold the replicas it starts
  with; Ray's in-tree autoscaler adds and removes workers between the two;
* the registry URI from a ``ConfigMap`` key and the API keys from a ``Secret`` key (references
  only: no value is ever written), probes, and Serve's environment
  (:data:`graphs.deploy.SERVE_ENV`);
* ``serveService``: the ``Service`` KubeRay keeps pointed at the pods that serve, with the HTTP
  port and the gRPC port when the config turns gRPC on;
* an ``Ingress`` that terminates TLS with the certificate of a ``Secret``.

Every manifest is validated before it is written: the ``RayService`` against KubeRay's CRD (vendored
in ``cluster/k8s/crd/``, with unknown fields refused as the API server's pruning would drop them),
the ``Service``, the ``Ingress`` and every pod template against Kubernetes' own schemas
(``kubernetes-validate``). A config with a replica that no group's node could ever hold is refused
with the deployment, what it asks and what the groups offer.

    python -m cluster.kuberay serve_config.yaml --output cluster/k8s/intent-serving.yaml
    python -m cluster.kuberay serve_config.gpu.yaml --gpu-worker 1:8:32Gi \
        --output cluster/k8s/intent-serving-gpu.yaml
    python -m cluster.kuberay serve_config.yaml --check cluster/k8s/intent-serving.yaml
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from servecore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "cluster" / "k8s" / "crd" / "ray.io_rayservices.crd.yaml.gz"
KUBERNETES_VERSION = "1.33.0"
"""Schemas the core objects are validated against (``kubernetes-validate`` ships them)."""
RAY_VERSION = "2.60.0"
HTTP_PORT = 8000
DASHBOARD_PORT = 8265
RAY_METRICS_PORT = 8080


SHIPPED: dict[str, tuple[str, list[str]]] = {
    "cluster/k8s/intent-serving.yaml": ("serve_config.yaml", []),
    "cluster/k8s/intent-serving-gpu.yaml": (
        "serve_config.gpu.yaml",
        ["--gpu-worker", "1:8:32Gi", "--image", f"intent-serving:{RAY_VERSION}-cu128"],
    ),
}
"""The manifests committed in the repository: output file -> (Serve config, extra arguments).
``python -m cluster.kuberay --shipped`` (``make k8s``) writes them; the tests check they are
current."""


class Unschedulable(ConfigError):
    """A replica asks for more than any node of any worker group has."""


@dataclass(frozen=True)
class NodeShape:
    """One pod of a worker group: what Ray may schedule on it and what Kubernetes reserves."""

    cpus: float
    memory: str
    gpus: int = 0

    @classmethod
    def parse(cls, text: str, gpu: bool) -> NodeShape:
        """``CPUS:MEMORY`` (CPU group) or ``GPUS:CPUS:MEMORY`` (GPU group), e.g. ``1:8:32Gi``."""
        parts = text.split(":")
        try:
            if gpu and len(parts) == 3:
                return cls(cpus=float(parts[1]), memory=parts[2], gpus=int(parts[0]))
            if not gpu and len(parts) == 2:
                return cls(cpus=float(parts[0]), memory=parts[1])
        except ValueError:
            pass
        shape = "GPUS:CPUS:MEMORY" if gpu else "CPUS:MEMORY"
        raise argparse.ArgumentTypeError(f"{text!r}: expected {shape}, e.g. 1:8:32Gi or 4:16Gi")


@dataclass(frozen=True)
class Options:
    name: str = "intent-serving"
    namespace: str = "default"
    image: str = f"intent-serving:{RAY_VERSION}-cpu"
    cpu_worker: NodeShape = NodeShape(cpus=4, memory="16Gi")
    gpu_worker: NodeShape | None = None
    head: NodeShape = NodeShape(cpus=2, memory="8Gi")
    max_workers_per_group: int = 16
    mlflow_configmap: str = "intent-serving"
    """ConfigMap with ``MLFLOW_TRACKING_URI`` (required) and optional ``INTENT_SERVING_*`` keys."""
    api_keys_secret: str = "intent-serving-api-keys"
    """Secret with ``api_keys`` (``INTENT_SERVING_API_KEYS``, the hashed key list)."""
    ingress_host: str = "intent.example.com"
    tls_secret: str = "intent-serving-tls"
    ingress_class: str = "nginx"
    gcs_redis: str | None = None
    """``host:port`` of an external Redis for GCS fault tolerance (password from a Secret)."""


@dataclass
class Demand:
    """What one deployment asks for: per replica, and replicas at start and at most."""

    app: str
    deployment: str
    cpus: float
    gpus: float
    memory: float
    resources: dict[str, float]
    start: int
    most: int

    @property
    def label(self) -> str:
        return f"applications[{self.app}].deployments[{self.deployment}]"


@dataclass
class Group:
    name: str
    shape: NodeShape
    demands: list[Demand] = field(default_factory=list)

    def holds(self, demand: Demand) -> bool:
        return (
            demand.cpus <= self.shape.cpus + 1e-9
            and demand.gpus <= self.shape.gpus + 1e-9
            and demand.memory <= memory_bytes(self.shape.memory)
            and not demand.resources
        )

    def nodes_for(self, replicas: str) -> int:
        """Nodes that hold every demand at ``start`` or ``most`` replicas (first-fit by totals,
        rounded up per resource; Ray packs fractional GPU replicas onto one card)."""
        cpus = sum(d.cpus * getattr(d, replicas) for d in self.demands)
        gpus = sum(d.gpus * getattr(d, replicas) for d in self.demands)
        need = math.ceil(cpus / self.shape.cpus - 1e-9) if self.shape.cpus else 0
        if self.shape.gpus:
            need = max(need, math.ceil(gpus / self.shape.gpus - 1e-9))
        return need


def memory_bytes(quantity: str | float | int) -> float:
    """A Kubernetes memory quantity (``16Gi``, ``512M``, bytes) in bytes."""
    if isinstance(quantity, int | float):
        return float(quantity)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTE]i?)?", quantity.strip())
    if not match:
        raise ConfigError(f"memory {quantity!r} is not a Kubernetes quantity")
    number, unit = float(match.group(1)), match.group(2) or ""
    powers = {"K": 1, "M": 2, "G": 3, "T": 4, "E": 6}
    if not unit:
        return number
    base = 1024 if unit.endswith("i") else 1000
    return number * base ** powers[unit[0]]


def _replicas(deployment: dict[str, Any]) -> tuple[int, int]:
    scaling = deployment.get("autoscaling_config")
    if isinstance(scaling, dict):
        start = scaling.get("initial_replicas", scaling.get("min_replicas", 1))
        return int(start if start is not None else 1), int(scaling.get("max_replicas", 1))
    fixed = int(deployment.get("num_replicas") or 1)
    return fixed, fixed


def demands(config: dict[str, Any]) -> list[Demand]:
    found = []
    for entry in config.get("applications") or []:
        for deployment in entry.get("deployments") or []:
            options = deployment.get("ray_actor_options") or {}
            start, most = _replicas(deployment)
            found.append(
                Demand(
                    app=str(entry.get("name", "?")),
                    deployment=str(deployment.get("name", "?")),
                    cpus=float(options.get("num_cpus") or 0.0),
                    gpus=float(options.get("num_gpus") or 0.0),
                    memory=float(options.get("memory") or 0.0),
                    resources={k: float(v) for k, v in (options.get("resources") or {}).items()},
                    start=start,
                    most=most,
                )
            )
    return found


def plan_groups(config: dict[str, Any], options: Options) -> list[Group]:
    """Worker groups for the config's deployments; :class:`Unschedulable` when a replica fits
    no group's node. GPU replicas go to the GPU group; the rest to the CPU group (a replica that
    asks for nothing may land anywhere, the head included, and counts nowhere)."""
    cpu = Group("cpu", options.cpu_worker)
    gpu = Group("gpu", options.gpu_worker) if options.gpu_worker else None
    problems = []
    for demand in demands(config):
        target = gpu if demand.gpus > 0 else cpu
        if demand.gpus > 0 and gpu is None:
            problems.append(
                f"{demand.label}: a replica asks num_gpus = {demand.gpus:g} and there is no GPU "
                "worker group (give --gpu-worker GPUS:CPUS:MEMORY)"
            )
            continue
        assert target is not None
        if not target.holds(demand):
            asked = f"num_cpus = {demand.cpus:g}, num_gpus = {demand.gpus:g}"
            if demand.memory:
                asked += f", memory = {demand.memory:g} bytes"
            if demand.resources:
                asked += f", resources = {demand.resources}"
            offered = f"{target.shape.cpus:g} CPUs, {target.shape.gpus} GPUs, {target.shape.memory}"
            problems.append(
                f"{demand.label}: a replica asks {asked}; a {target.name} worker has "
                f"{offered}, so it could never be scheduled"
            )
            continue
        if demand.cpus > 0 or demand.gpus > 0:
            target.demands.append(demand)
    if problems:
        raise Unschedulable("unschedulable config:\n  " + "\n  ".join(problems))
    return [cpu] + ([gpu] if gpu else [])


def serve_config_v2(config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config as it runs in the pods: bound to every interface, a proxy on every node."""
    served = copy.deepcopy(config)
    served["proxy_location"] = "EveryNode"
    served.setdefault("http_options", {})["host"] = "0.0.0.0"
    return served


def _env(options: Options) -> list[dict[str, Any]]:
    from graphs.deploy import SERVE_ENV

    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in SERVE_ENV.items()]
    env.append(
        {
            "name": "MLFLOW_TRACKING_URI",
            "valueFrom": {
                "configMapKeyRef": {"name": options.mlflow_configmap, "key": "MLFLOW_TRACKING_URI"}
            },
        }
    )
    env.append(
        {
            "name": "INTENT_SERVING_API_KEYS",
            "valueFrom": {"secretKeyRef": {"name": options.api_keys_secret, "key": "api_keys"}},
        }
    )
    return env


def _container(name: str, options: Options, shape: NodeShape, ports: list[int]) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": f"{shape.cpus:g}", "memory": shape.memory}
    if shape.gpus:
        limits["nvidia.com/gpu"] = shape.gpus
    port_names = {
        6379: "gcs",
        DASHBOARD_PORT: "dashboard",
        10001: "client",
        HTTP_PORT: "serve",
        9000: "grpc",
        RAY_METRICS_PORT: "metrics",
    }
    return {
        "name": name,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(options),
        # Optional extras (job store, brokers, streams, webhook key...) as INTENT_SERVING_* keys.
        "envFrom": [{"configMapRef": {"name": options.mlflow_configmap, "optional": True}}],
        "resources": {"limits": limits, "requests": dict(limits)},
        "ports": [{"containerPort": p, "name": port_names[p]} for p in ports],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
        # Ray's own health endpoints: the raylet on every node, the GCS on the head.
        "livenessProbe": _probe(
            "http://localhost:52365/api/local_raylet_healthz", period=10, failures=6
        ),
        "readinessProbe": _probe(
            "http://localhost:52365/api/local_raylet_healthz", period=5, failures=3
        ),
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }


def _probe(url: str, period: int, failures: int) -> dict[str, Any]:
    check = f"import urllib.request as u; u.urlopen('{url}', timeout=2).read()"
    return {
        "exec": {"command": ["python", "-c", check]},
        "initialDelaySeconds": 10,
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _pod(container: dict[str, Any], options: Options, shape: NodeShape) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        # Replicas drain (graceful shutdown, the ingress draining period) before the pod goes.
        "terminationGracePeriodSeconds": 60,
        "volumes": [{"name": "ray-logs", "emptyDir": {}}],
    }
    container["volumeMounts"] = [{"name": "ray-logs", "mountPath": "/tmp/ray"}]
    if shape.gpus:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": {"app.kubernetes.io/name": options.name}}, "spec": spec}


def _worker_group(group: Group, options: Options) -> dict[str, Any]:
    start = min(group.nodes_for("start"), options.max_workers_per_group)
    most = min(max(group.nodes_for("most"), start, 1), options.max_workers_per_group)
    params = {"num-cpus": f"{group.shape.cpus:g}", "metrics-export-port": str(RAY_METRICS_PORT)}
    if group.shape.gpus:
        params["num-gpus"] = str(group.shape.gpus)
    container = _container("ray-worker", options, group.shape, [HTTP_PORT, RAY_METRICS_PORT])
    return {
        "groupName": f"{group.name}-workers",
        "replicas": start,
        "minReplicas": start,
        "maxReplicas": most,
        "idleTimeoutSeconds": 120,
        "rayStartParams": params,
        "template": _pod(container, options, group.shape),
    }


def _ports(config: dict[str, Any]) -> list[dict[str, Any]]:
    http = int((config.get("http_options") or {}).get("port", HTTP_PORT))
    ports = [{"name": "http", "port": http, "targetPort": http, "protocol": "TCP"}]
    grpc = config.get("grpc_options") or {}
    if grpc.get("grpc_servicer_functions"):
        port = int(grpc.get("port", 9000))
        ports.append({"name": "grpc", "port": port, "targetPort": port, "protocol": "TCP"})
    return ports


def build(config: dict[str, Any], options: Options) -> list[dict[str, Any]]:
    """``RayService`` and ``Ingress`` for ``config`` (:func:`validate` checks them)."""
    groups = plan_groups(config, options)
    head_ports = [6379, DASHBOARD_PORT, 10001, HTTP_PORT, RAY_METRICS_PORT]
    if any(p["name"] == "grpc" for p in _ports(config)):
        head_ports.append(9000)
    head = _container("ray-head", options, options.head, head_ports)
    labels = {"app.kubernetes.io/name": options.name, "app.kubernetes.io/part-of": "intent-serving"}
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 120},
        "headGroupSpec": {
            "rayStartParams": {
                # The head runs the GCS, the Serve controller and a proxy; replicas go to workers.
                "num-cpus": "0",
                "dashboard-host": "0.0.0.0",
                "metrics-export-port": str(RAY_METRICS_PORT),
            },
            "template": _pod(head, options, options.head),
        },
        "workerGroupSpecs": [_worker_group(group, options) for group in groups],
    }
    if options.gcs_redis:
        cluster["gcsFaultToleranceOptions"] = {
            "redisAddress": options.gcs_redis,
            "redisPassword": {
                "valueFrom": {
                    "secretKeyRef": {"name": f"{options.name}-gcs-redis", "key": "password"}
                }
            },
        }
    serve_service = {
        "metadata": {"name": f"{options.name}-serve", "labels": labels},
        "spec": {"type": "ClusterIP", "ports": _ports(config)},
    }
    rayservice = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": options.name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config_v2(config), sort_keys=False),
            "serveService": serve_service,
            # The head's proxy serves too: with few workers it is one more way in.
            "excludeHeadPodFromServeSvc": False,
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterConfig": cluster,
        },
    }
    http_port = _ports(config)[0]["port"]
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": options.name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "ingressClassName": options.ingress_class,
            "tls": [{"hosts": [options.ingress_host], "secretName": options.tls_secret}],
            "rules": [
                {
                    "host": options.ingress_host,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {
                                        "name": serve_service["metadata"]["name"],
                                        "port": {"number": http_port},
                                    }
                                },
                            }
                        ]
                    },
                }
            ],
        },
    }
    return [rayservice, ingress]


@cache
def rayservice_schema() -> dict[str, Any]:
    """KubeRay's ``v1`` RayService schema, made strict: an unknown field is an error (the API
    server would prune it without a word, which is how a typo goes unnoticed)."""
    crd = yaml.safe_load(gzip.decompress(CRD_PATH.read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    for node in _objects(schema):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    return schema


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _k8s(resource: dict[str, Any], where: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{where}: {path}: {e.message}"]
    return []


def validate(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """Problems of ``manifests``: RayServices against the CRD, the rest against Kubernetes."""
    import jsonschema

    problems: list[str] = []
    for manifest in manifests:
        name = f"{manifest.get('kind')}/{(manifest.get('metadata') or {}).get('name')}"
        if manifest.get("kind") != "RayService":
            problems += _k8s(manifest, name)
            continue
        validator = jsonschema.Draft7Validator(rayservice_schema())
        for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in error.path)
            problems.append(f"{name}: {path}: {error.message}")
        spec = manifest.get("spec") or {}
        service = spec.get("serveService")
        if service:
            core = {"apiVersion": "v1", "kind": "Service", **service}
            problems += _k8s(core, f"{name} serveService")
        cluster = spec.get("rayClusterConfig") or {}
        templates = [("head", (cluster.get("headGroupSpec") or {}).get("template"))] + [
            (g.get("groupName"), g.get("template")) for g in cluster.get("workerGroupSpecs") or []
        ]
        for group, template in templates:
            pod = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{group}"},
                "template": template,
            }
            problems += _k8s(pod, f"{name} {group} pod template")
        try:
            served = yaml.safe_load(spec.get("serveConfigV2") or "")
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(served)
        except Exception as e:  # noqa: BLE001 - any parse or schema failure is the finding
            problems.append(f"{name}: serveConfigV2 is not a Serve config: {e}")
    return problems


HEADER = """\
# Generated from {source} by `python -m cluster.kuberay`: edit that file and regenerate
# (`make k8s` for the manifests in cluster/k8s/, which tests/test_kuberay.py keeps current).
# Before `kubectl apply -f` this file, create what it references (values never live here):
#   kubectl create configmap {cm} --from-literal=MLFLOW_TRACKING_URI=http://mlflow:5000
#   kubectl create secret generic {keys} --from-literal=api_keys="$INTENT_SERVING_API_KEYS"
#   kubectl create secret tls {tls} --cert=tls.crt --key=tls.key
"""


class _Dumper(yaml.SafeDumper):
    """Readable manifests: the embedded Serve config as a ``|`` block, no ``&id`` anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render(manifests: Sequence[dict[str, Any]], source: str, options: Options) -> str:
    header = HEADER.format(
        source=source,
        cm=options.mlflow_configmap,
        keys=options.api_keys_secret,
        tls=options.tls_secret,
    )
    return header + yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=100)


def generate(config_path: str | Path, options: Options) -> str:
    """The validated manifests of one Serve config file, as YAML text."""
    from servecore.config_check import check_config, load_config

    problems = check_config(config_path)
    if problems:
        raise ConfigError(f"{config_path}: fix the Serve config first:\n  " + "\n  ".join(problems))
    manifests = build(load_config(config_path), options)
    problems = validate(manifests)
    if problems:
        raise ConfigError("generated manifests do not validate:\n  " + "\n  ".join(problems))
    source = Path(config_path).resolve()
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    return render(manifests, str(shown), options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.kuberay", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", nargs="?", help="Serve config file (serve_config.yaml)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, help="write the manifests here (default: stdout)")
    out.add_argument("--check", type=Path, help="fail if this file differs from what is generated")
    out.add_argument(
        "--shipped", action="store_true", help="write the manifests in cluster/k8s/ (SHIPPED)"
    )
    parser.add_argument("--name", default=Options.name)
    parser.add_argument("--namespace", default=Options.namespace)
    parser.add_argument("--image", default=Options.image)
    parser.add_argument(
        "--cpu-worker",
        type=lambda t: NodeShape.parse(t, gpu=False),
        default=Options.cpu_worker,
        help="CPUS:MEMORY of one CPU worker pod (default: 4:16Gi)",
    )
    parser.add_argument(
        "--gpu-worker",
        type=lambda t: NodeShape.parse(t, gpu=True),
        default=None,
        help="GPUS:CPUS:MEMORY of one GPU worker pod; without it, no GPU group",
    )
    parser.add_argument("--max-workers", type=int, default=Options.max_workers_per_group)
    parser.add_argument("--ingress-host", default=Options.ingress_host)
    parser.add_argument("--tls-secret", default=Options.tls_secret)
    parser.add_argument("--gcs-redis", default=None, help="HOST:PORT for GCS fault tolerance")
    args = parser.parse_args(argv)
    if args.shipped:
        for output, (config, extra) in SHIPPED.items():
            code = main([str(ROOT / config), "--output", str(ROOT / output), *extra])
            if code:
                return code
        return 0
    if args.config is None:
        parser.error("give a Serve config file (or --shipped)")
    options = Options(
        name=args.name,
        namespace=args.namespace,
        image=args.image,
        cpu_worker=args.cpu_worker,
        gpu_worker=args.gpu_worker,
        max_workers_per_group=args.max_workers,
        ingress_host=args.ingress_host,
        tls_secret=args.tls_secret,
        gcs_redis=args.gcs_redis,
    )
    try:
        text = generate(args.config, options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check is not None:
        if not args.check.exists() or args.check.read_text() != text:
            print(f"{args.check} is stale: regenerate it (make k8s)", file=sys.stderr)
            return 1
        return 0
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
