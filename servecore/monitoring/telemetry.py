"""The model-level metrics this platform exports, beside Ray Serve's built-in ones (DESIGN 8).

Every metric is declared once in :data:`CATALOGUE` (name, kind, tags, meaning): the docs table
(``docs/metrics.md``), the Grafana dashboard test and the replicas all read it from here, so a
metric cannot be recorded under one name and charted under another.

Metrics are ``ray.serve.metrics`` objects, created lazily per process by :func:`metric` (importing
this module imports no Ray). Ray exports them on each node's metrics port with a ``ray_`` prefix,
counters with a ``_total`` suffix (:func:`exported_name`), and adds Serve's own tags
(``application``, ``deployment``, ``replica``) to every series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_MS_BUCKETS = (
    0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100, 150,
    200, 300, 500, 1000, 2000, 5000, 10000, 30000,
)  # fmt: skip
"""Fine below 50 ms, where one request's stages and hops live: Ray exports a histogram's sum as
the sum of its buckets' midpoints, so the latency budget (``bench/budget.py``) is only as exact
as these buckets are narrow. The same list is Serve's own request-latency buckets
(``graphs.deploy.SERVE_ENV``)."""
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    tags: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()


CATALOGUE: tuple[MetricSpec, ...] = (
    MetricSpec(
        "intent_inference_latency_ms",
        "histogram",
        ("stage", "model", "version"),
        "Time of one model call on one batch, per stage and registered model version "
        "(`model`/`version` are `local` for a stage loaded from a folder).",
        LATENCY_MS_BUCKETS,
    ),
    MetricSpec(
        "intent_batch_size",
        "histogram",
        ("stage",),
        'Rows per model call of a stage; `stage="Gateway"` counts the texts per coalesced '
        "graph call.",
        BATCH_ROW_BUCKETS,
    ),
    MetricSpec(
        "intent_request_latency_ms",
        "histogram",
        ("variant", "outcome"),
        "Gateway time to answer one classification request (cache, pipeline, fallback "
        "included); `outcome` is `ok`, `degraded` or `error`.",
        LATENCY_MS_BUCKETS,
    ),
    MetricSpec(
        "intent_predictions",
        "counter",
        ("variant", "label"),
        "Texts answered, per A/B variant and predicted label (cached answers included).",
    ),
    MetricSpec(
        "intent_variant_requests",
        "counter",
        ("variant",),
        "Classification requests routed to each A/B variant.",
    ),
    MetricSpec(
        "intent_cache_lookups",
        "counter",
        ("result",),
        "Response-cache lookups per text: `hit`, `miss`, or `bypass` (`Cache-Control: no-cache`).",
    ),
    MetricSpec(
        "intent_fallbacks",
        "counter",
        ("reason",),
        "Requests answered by the fallback model, by why the primary did not answer: "
        "`circuit_open`, `deadline` or `error`.",
    ),
    MetricSpec(
        "intent_shadow_comparisons",
        "counter",
        ("variant", "outcome"),
        "Texts scored by the shadow variant and compared with the served label: "
        "`agree` or `disagree` (agreement = agree / all).",
    ),
    MetricSpec(
        "intent_rollout_decisions",
        "counter",
        ("app", "action", "by"),
        "Rollout decisions: `start`, `advance`, `promote`, `rollback`, `pause`, `resume`, "
        "`abort`; `by` is `auto` (the gates) or who acted. A `rollback` by `auto` is an "
        "automatic rollback.",
    ),
    MetricSpec(
        "intent_rollout_step",
        "gauge",
        ("app",),
        "Step (0-based) of the application's current rollout, from each gateway replica.",
    ),
    MetricSpec(
        "intent_rollout_traffic",
        "gauge",
        ("app",),
        "Percent of requests the rollout's candidate answers now (0 in a shadow step and once "
        "the rollout has ended).",
    ),
    MetricSpec(
        "intent_rollout_status",
        "gauge",
        ("app",),
        "The current rollout: 0 running, 1 completed (promoted), -1 rolled back, -2 aborted.",
    ),
    MetricSpec(
        "intent_rollout_gate",
        "gauge",
        ("app", "gate"),
        "Last verdict of each rollout gate (`errors`, `latency`, `agreement`, `accuracy`, "
        "`drift`): 1 pass, 0.5 not measured in this step, 0 waiting for evidence, -1 fail.",
    ),
    MetricSpec(
        "intent_jobs",
        "gauge",
        ("state",),
        "Asynchronous jobs in the job store per state (`queued`, `running`, `succeeded`, "
        "`failed`, `cancelled`), refreshed by every job runner replica.",
    ),
    MetricSpec(
        "intent_monitor_records",
        "counter",
        ("outcome",),
        "Sampled answers that reached the monitor: `logged` to the prediction log, `scored` "
        "for drift, `dropped` (a full buffer, or no reference profile to score against); "
        "`embedded` counts the scored ones the monitor had to embed itself (cached answers: the "
        "others brought their embedding from the graph call that answered them).",
    ),
    MetricSpec(
        "intent_drift_score",
        "gauge",
        ("signal",),
        "Drift of the live window against the reference profile: `embedding` is the "
        "Kolmogorov-Smirnov statistic of the centroid-similarity distribution, `label` the total "
        "variation distance of the predicted-label distribution (both 0 = same, 1 = disjoint).",
    ),
    MetricSpec(
        "intent_drift_alarm",
        "gauge",
        ("signal",),
        "1 while the signal's drift score is above its threshold (window full enough), else 0.",
    ),
    MetricSpec(
        "intent_drift_window",
        "gauge",
        (),
        "Texts in the monitor's sliding window.",
    ),
    MetricSpec(
        "intent_stream_messages",
        "counter",
        ("stream", "outcome"),
        "Stream messages per input stream and outcome: `scored` (a result written), "
        "`dead_letter`, `duplicate` (scored again after a redelivery, not written twice), "
        "`retried` (a transient failure, tried again) and `claimed` (taken over from a dead "
        "consumer). Throughput is the rate of `scored`.",
    ),
    MetricSpec(
        "intent_stream_latency_ms",
        "histogram",
        ("stream",),
        "End to end per message: from the time in its stream id (when Redis took it in) to its "
        "result's write.",
        LATENCY_MS_BUCKETS,
    ),
    MetricSpec(
        "intent_stream_lag",
        "gauge",
        ("stream", "group"),
        "Entries of the input stream not yet delivered to the consumer group (Redis's own "
        "`lag`), read every `status_interval_s` by each consumer replica.",
    ),
    MetricSpec(
        "intent_stream_pending",
        "gauge",
        ("stream", "group"),
        "Entries delivered to a consumer but not yet acknowledged (being scored, or left by a "
        "dead consumer until claimed).",
    ),
)

SPECS = {spec.name: spec for spec in CATALOGUE}
_created: dict[str, Any] = {}


def exported_name(spec: MetricSpec) -> str:
    """The family's name on the Prometheus endpoint."""
    return f"ray_{spec.name}_total" if spec.kind == "counter" else f"ray_{spec.name}"


def metric(name: str) -> Any:
    """The process's ``ray.serve.metrics`` object for ``name`` (created on first use).

    Outside a Serve replica the Serve tags are empty, which Ray accepts.
    """
    found = _created.get(name)
    if found is not None:
        return found
    from ray.serve import metrics

    spec = SPECS[name]
    tags: Any = spec.tags  # Ray annotates tag_keys as a one-element tuple
    if spec.kind == "counter":
        created: Any = metrics.Counter(spec.name, spec.description, tag_keys=tags)
    elif spec.kind == "gauge":
        created = metrics.Gauge(spec.name, spec.description, tag_keys=tags)
    else:
        created = metrics.Histogram(
            spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=tags
        )
    _created[name] = created
    return created


def markdown_table() -> str:
    """The metrics table of ``docs/metrics.md``."""
    rows = ["| metric (as exported) | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for spec in CATALOGUE:
        labels = ", ".join(f"`{t}`" for t in spec.tags) or "—"
        rows.append(f"| `{exported_name(spec)}` | {spec.kind} | {labels} | {spec.description} |")
    return "\n".join(rows)
