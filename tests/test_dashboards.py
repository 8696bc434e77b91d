"""The monitoring files agree with the metric catalogue and with Ray Serve (issue 6).

File checks only, no Ray and no network: the metrics docs hold the catalogue's table, the Grafana
dashboard is what its generator writes, every metric a dashboard or alert query names exists (in
``servecore.monitoring.telemetry.CATALOGUE``, or among the Serve built-ins below, each of which must
still be spelled so in the installed Ray Serve source), every catalogue metric is charted, and the
Prometheus config scrapes Ray's service-discovery file.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from cluster.grafana import build_dashboard
from servecore.monitoring.telemetry import CATALOGUE, MetricSpec, exported_name, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "cluster" / "grafana" / "intent-serving.json"
PROVISIONING = ROOT / "cluster" / "grafana" / "provisioning"
PROMETHEUS = ROOT / "cluster" / "prometheus" / "prometheus.yml"
DOCS = ROOT / "docs" / "metrics.md"
HISTOGRAM_SUFFIXES = ("bucket", "sum", "count")

SERVE_BUILTINS = {
    # Name as Ray Serve's source spells it -> kind. The proxies' request metrics are f-strings over
    # the lower-cased protocol (`serve_num_{protocol_name}_requests`); for HTTP that is "http".
    "serve_num_{protocol_name}_requests": "counter",
    "serve_num_{protocol_name}_error_requests": "counter",
    "serve_num_deployment_{protocol_name}_error_requests": "counter",
    "serve_{protocol_name}_request_latency_ms": "histogram",
    "serve_deployment_replica_healthy": "gauge",
    "serve_autoscaling_target_replicas": "gauge",
    "serve_replica_processing_queries": "gauge",
    "serve_actual_batch_size": "histogram",
    "serve_batch_queue_length": "gauge",
}

QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def series(exported: str, kind: str) -> set[str]:
    """The series names of one metric family on the Prometheus endpoint."""
    if kind == "histogram":
        return {f"{exported}_{suffix}" for suffix in HISTOGRAM_SUFFIXES}
    return {exported}


def catalogue_series(spec: MetricSpec) -> set[str]:
    return series(exported_name(spec), spec.kind)


def builtin_series(source_name: str, kind: str) -> set[str]:
    name = "ray_" + source_name.replace("{protocol_name}", "http")
    return series(f"{name}_total" if kind == "counter" else name, kind)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label values and Grafana variables left out)."""
    bare = QUOTED.sub('""', expr)
    return {
        token
        for token in IDENTIFIER.findall(bare)
        if token.startswith("ray_") or "intent_" in token or "serve_" in token
    }


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@cache
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS.read_text())


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard()["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], target["expr"]) for target in inner.get("targets", [])]
    return found


def rule_queries() -> list[tuple[str, str]]:
    found = []
    for rule_file in prometheus_config()["rule_files"]:
        rules = yaml.safe_load((PROMETHEUS.parent / rule_file).read_text())
        for group in rules["groups"]:
            found += [(rule["alert"], rule["expr"]) for rule in group["rules"]]
    return found


def variable_queries() -> list[tuple[str, str]]:
    return [
        (variable["name"], variable["definition"])
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "query"
    ]


@cache
def ray_file(*parts: str) -> Path:
    spec = importlib.util.find_spec("ray")  # locates the package without importing Ray
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


@cache
def serve_source() -> str:
    files = sorted(ray_file("serve").rglob("*.py"))
    return "\n".join(f.read_text() for f in files if "tests" not in f.parts)


def test_docs_hold_the_catalogue_table() -> None:
    assert markdown_table() in DOCS.read_text(), (
        "docs/metrics.md is out of date: run `python cluster/grafana/build_dashboard.py`"
    )


def test_dashboard_json_is_the_generators_output() -> None:
    assert DASHBOARD.read_text() == build_dashboard.render(), (
        "intent-serving.json is out of date: run `python cluster/grafana/build_dashboard.py`"
    )
    assert dashboard()["schemaVersion"] >= 39
    assert {v["name"] for v in dashboard()["templating"]["list"]} == {"datasource", "application"}


def test_every_queried_metric_exists() -> None:
    known = set().union(
        *(catalogue_series(spec) for spec in CATALOGUE),
        *(builtin_series(name, kind) for name, kind in SERVE_BUILTINS.items()),
    )
    for where, expr in panel_queries() + rule_queries() + variable_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: unknown metrics {sorted(names - known)}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where


def test_serve_builtins_are_in_ray_and_on_the_dashboard() -> None:
    source = serve_source()
    used = set().union(*(metric_names(expr) for _, expr in panel_queries() + rule_queries()))
    for name, kind in SERVE_BUILTINS.items():
        assert f'"{name}"' in source, f"Ray Serve no longer defines {name!r}"
        assert builtin_series(name, kind) & used, f"{name} is listed but charted nowhere"


def test_every_catalogue_metric_is_charted() -> None:
    charted = set().union(*(metric_names(expr) for _, expr in panel_queries()))
    missing = [spec.name for spec in CATALOGUE if not catalogue_series(spec) & charted]
    assert not missing, f"no dashboard panel shows {missing}"


def test_prometheus_scrapes_every_node_through_rays_discovery_file() -> None:
    constants = ray_file("_private", "ray_constants.py").read_text()
    discovery = re.search(r'PROMETHEUS_SERVICE_DISCOVERY_FILE = "([^"]+)"', constants)
    assert discovery is not None
    files = [
        path
        for job in prometheus_config()["scrape_configs"]
        for sd in job.get("file_sd_configs", [])
        for path in sd["files"]
    ]
    assert files and all(Path(path).name == discovery.group(1) for path in files)
    alerts = {name for name, _ in rule_queries()}
    assert {"IntentDriftAlarm", "IntentHighServerErrorRate", "IntentFallbacksRising"} <= alerts

    datasources = yaml.safe_load((PROVISIONING / "datasources.yml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING / "dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"]
