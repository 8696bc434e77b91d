"""The KubeRay manifests: generated from the Serve configs, valid, current, and honest about fit.

``cluster/kuberay.py`` writes a ``RayService`` (the Serve config embedded as ``serveConfigV2``)
and a TLS ``Ingress``. These tests validate every shipped manifest offline against KubeRay's CRD
and Kubernetes' own schemas, prove the validators can fail, and check that a config change moves
the manifest and that a replica no node could hold is refused. No cluster, no network.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import kuberay
from cluster.kuberay import SHIPPED, NodeShape, Options, Unschedulable
from servecore.config_check import load_config

ROOT = Path(__file__).resolve().parents[1]


def manifests_of(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "RayService")


def groups(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    specs = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["groupName"]: g for g in specs}


def shipped_options(extra: list[str]) -> Options:
    gpu = extra[extra.index("--gpu-worker") + 1] if "--gpu-worker" in extra else None
    return Options(gpu_worker=NodeShape.parse(gpu, gpu=True) if gpu else None)


@pytest.mark.parametrize("output", sorted(SHIPPED))
def test_shipped_manifests_are_current_and_validate(output: str) -> None:
    config, extra = SHIPPED[output]
    assert kuberay.main([str(ROOT / config), "--check", str(ROOT / output), *extra]) == 0, (
        f"{output} is stale: run `make k8s`"
    )
    docs = manifests_of((ROOT / output).read_text())
    assert kuberay.validate(docs) == []
    assert {d["kind"] for d in docs} == {"RayService", "Ingress"}
    # One source of truth: the embedded config is the file, with only the binding changed.
    source = load_config(ROOT / config)
    served = yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])
    assert served["http_options"]["host"] == "0.0.0.0"
    assert served["proxy_location"] == "EveryNode"
    for key in ("http_options", "proxy_location"):
        served.pop(key), source.pop(key)
    assert served == source


def test_the_gpu_manifest_sizes_its_groups_from_the_configs_actor_options() -> None:
    docs = manifests_of((ROOT / "cluster/k8s/intent-serving-gpu.yaml").read_text())
    found = groups(rayservice(docs))
    assert set(found) == {"cpu-workers", "gpu-workers"}
    gpu = found["gpu-workers"]
    # Encoder: a quarter GPU and one CPU per replica, up to four replicas: one 1-GPU, 8-CPU node.
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1)
    # Preprocess: one CPU per replica, up to four: one 4-CPU worker.
    assert found["cpu-workers"]["maxReplicas"] == 1
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_a_changed_serve_config_changes_the_manifest_with_no_hand_edit(tmp_path: Path) -> None:
    config = load_config(ROOT / "serve_config.yaml")
    before = manifests_of(kuberay.render(kuberay.build(config, Options()), "x", Options()))
    changed = copy.deepcopy(config)
    pipeline = next(d for d in changed["applications"][0]["deployments"] if d["name"] == "Pipeline")
    pipeline["autoscaling_config"]["max_replicas"] = 10  # 10 CPUs: three 4-CPU workers
    pipeline["user_config"]["max_batch_size"] = 16
    del changed["grpc_options"]
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(changed, sort_keys=False))
    after = manifests_of(kuberay.generate(path, Options()))
    assert kuberay.validate(after) == []
    served = yaml.safe_load(rayservice(after)["spec"]["serveConfigV2"])
    deployments = {d["name"]: d for d in served["applications"][0]["deployments"]}
    assert deployments["Pipeline"]["autoscaling_config"]["max_replicas"] == 10
    assert deployments["Pipeline"]["user_config"]["max_batch_size"] == 16
    assert groups(rayservice(before))["cpu-workers"]["maxReplicas"] == 1
    assert groups(rayservice(after))["cpu-workers"]["maxReplicas"] == 3

    # gRPC off in the config: no gRPC port on the serving Service.
    def ports(docs: list[dict[str, Any]]) -> list[str]:
        return [p["name"] for p in rayservice(docs)["spec"]["serveService"]["spec"]["ports"]]

    assert ports(before) == ["http", "grpc"]
    assert ports(after) == ["http"]


def test_a_replica_no_node_can_hold_is_refused_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(ROOT / "serve_config.yaml")
    pipeline = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Pipeline")
    pipeline["ray_actor_options"]["num_cpus"] = 6
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert kuberay.main([str(path)]) == 1
    error = capsys.readouterr().err
    assert "applications[intent].deployments[Pipeline]: a replica asks num_cpus = 6" in error
    assert "a cpu worker has 4 CPUs, 0 GPUs, 16Gi, so it could never be scheduled" in error
    # ... and schedulable once the workers are large enough.
    assert kuberay.main([str(path), "--cpu-worker", "8:32Gi", "--output", str(tmp_path / "m")]) == 0

    with pytest.raises(Unschedulable, match=r"deployments\[Encoder\]: a replica asks num_gpus"):
        kuberay.generate(ROOT / "serve_config.gpu.yaml", Options())  # no GPU group given


def test_the_validators_catch_what_kubernetes_would_refuse_or_drop() -> None:
    docs = kuberay.build(load_config(ROOT / "serve_config.yaml"), Options())
    assert kuberay.validate(docs) == []
    service, ingress = copy.deepcopy(docs)
    # A misspelled field: the API server would prune it silently, the strict CRD schema refuses.
    service["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    service["spec"]["serveService"]["spec"]["ports"][0]["port"] = "eight thousand"
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    del ingress["spec"]["rules"][0]["http"]["paths"][0]["pathType"]
    problems = "\n".join(kuberay.validate([service, ingress]))
    assert "enableInTreeAutoscalling" in problems
    assert "serveService: spec.ports.0.port" in problems
    assert "cpu-workers pod template" in problems
    assert "Ingress/intent-serving: spec.rules.0.http.paths.0" in problems


def test_tls_secrets_and_registry_come_from_references_never_values() -> None:
    docs = manifests_of((ROOT / "cluster/k8s/intent-serving.yaml").read_text())
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    service = rayservice(docs)
    assert ingress["spec"]["tls"] == [
        {"hosts": ["intent.example.com"], "secretName": "intent-serving-tls"}
    ]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {
        "name": service["spec"]["serveService"]["metadata"]["name"],
        "port": {"number": 8000},
    }
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert (
            env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["key"]
            == "MLFLOW_TRACKING_URI"
        )
        assert env["INTENT_SERVING_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == (
            "intent-serving-api-keys"
        )
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        assert container["readinessProbe"] and container["livenessProbe"]
        assert container["securityContext"]["runAsNonRoot"] is True


def test_gcs_fault_tolerance_points_at_an_external_redis_when_asked() -> None:
    options = Options(gcs_redis="redis.ray.svc:6379")
    docs = kuberay.build(load_config(ROOT / "serve_config.yaml"), options)
    assert kuberay.validate(docs) == []
    ft = rayservice(docs)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.ray.svc:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "intent-serving-gcs-redis"
