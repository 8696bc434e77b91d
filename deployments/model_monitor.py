"""The monitor of a generic model application: the prediction log and per-feature input drift,
off the response path.

The gateway samples answered requests (``monitoring.sample_rate`` in its ``user_config``) and sends
them here in batches. Each record (inputs, outputs, versions, latency) goes to the prediction log
(:mod:`servecore.monitoring.prediction_log`; the inputs, as JSON, follow its ``text`` policy:
``hash`` by default, ``raw`` or ``omit``), and its inputs join a sliding window that
:meth:`ModelMonitor.drift` compares with the reference profile
(:mod:`servecore.monitoring.tabular_drift`: population stability index per feature, numeric
features binned at the reference's deciles, categorical ones by category).

The reference data is the spec's ``drift.reference_data`` (a file or an MLflow artifact URI), else
the ``reference_data`` tag of the model version served at start (the shipped example's bootstrap
logs its training split and sets the tag). Only the signature's input columns are profiled.
Keep ``num_replicas: 1``: the window lives in this replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from servecore.monitoring.prediction_log import PredictionLog, PredictionLogConfig
from servecore.monitoring.tabular_drift import ReferenceProfile, RowWindow
from servecore.monitoring.telemetry import metric
from servecore.pipeline.model_spec import ModelAppSpec
from servecore.settings import get_settings

logger = logging.getLogger("ray.serve")


class ModelMonitorUserConfig(BaseModel):
    """Live knobs of a generic model application's monitor."""

    model_config = ConfigDict(extra="forbid")

    window_size: int = Field(default=1000, ge=10, le=1_000_000)
    """Most recent sampled rows compared with the reference."""
    min_samples: int = Field(default=100, ge=1, le=1_000_000)
    """Rows the window needs before it reports drift (``warming_up`` until then)."""
    threshold: float = Field(default=0.2, gt=0.0, le=10.0)
    """PSI above which a feature drifted (0.1-0.2 moderate, above 0.2 significant)."""
    prediction_log: PredictionLogConfig = Field(default_factory=PredictionLogConfig)


def read_reference(source: str) -> pd.DataFrame:
    """A reference dataset: an MLflow artifact URI (``runs:/``, ``models:/``, ``mlflow-artifacts:``)
    is downloaded first; parquet, CSV or JSON lines by extension."""
    path = source
    if source.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow.artifacts

        from servecore.registry.client import configure_mlflow

        configure_mlflow()
        path = mlflow.artifacts.download_artifacts(artifact_uri=source)
    if path.endswith(".csv"):
        return pd.read_csv(path)
    if path.endswith((".jsonl", ".json")):
        return pd.read_json(path, lines=path.endswith(".jsonl"))
    return pd.read_parquet(path)


def load_reference(spec: ModelAppSpec) -> tuple[ReferenceProfile, str]:
    """The reference profile of ``spec``'s model and where its data came from (blocking)."""
    from servecore.registry.client import get_client, resolve
    from servecore.traffic.model_core import load_version_info

    ref = resolve(spec.model_uri)
    pinned = f"models:/{ref.name}/{ref.version}"
    source = spec.drift.reference_data
    if source is None:
        tags = get_client().get_model_version(ref.name, str(ref.version)).tags or {}
        source = tags.get("reference_data")
        if source is None:
            raise LookupError(
                f"{pinned} has no reference_data tag and the spec names no drift.reference_data"
            )
    schema = load_version_info(pinned).schema
    frame = read_reference(source)
    columns = [name for name in schema.input_names if name in frame.columns]
    if not columns:
        raise LookupError(f"{source} holds none of the model's inputs {list(schema.input_names)}")
    return ReferenceProfile.from_frame(frame[columns]), source


@serve.deployment(num_replicas=1, max_ongoing_requests=16)
class ModelMonitor:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ModelAppSpec.model_validate(spec)
        settings = get_settings()
        context = serve.get_replica_context()
        key = settings.prediction_log_key
        self.log = PredictionLog(
            settings.prediction_log_folder,
            writer=f"{context.app_name}-{context.replica_id.unique_id}",
            key=None if key is None else key.get_secret_value().encode(),
        )
        self.knobs = ModelMonitorUserConfig()
        self.window = RowWindow(self.knobs.window_size)
        self.profile: ReferenceProfile | None = None
        self.source: str | None = None
        self.reference_error: str | None = None
        self._loader = asyncio.get_event_loop().create_task(self._load_reference())

    async def _load_reference(self) -> None:
        try:
            self.profile, self.source = await asyncio.to_thread(load_reference, self.spec)
            self.reference_error = None
            logger.info("drift reference: %s (%d rows)", self.source, self.profile.rows)
        except Exception as e:  # noqa: BLE001 - no reference means no drift report, not a crash
            self.reference_error = f"{type(e).__name__}: {e}"
            logger.warning("no drift reference: %s", self.reference_error)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        knobs = ModelMonitorUserConfig.model_validate(config or {})
        if knobs.window_size != self.knobs.window_size:
            window = RowWindow(knobs.window_size)
            window.extend(self.window.frame().to_dict("records") if len(self.window) else [])
            self.window = window
        self.knobs = knobs
        self.log.configure(knobs.prediction_log)

    async def record(self, records: list[dict[str, Any]]) -> None:
        logged = [{**r, "text": json.dumps(r["inputs"], default=str)} for r in records]
        for r in logged:
            r.pop("inputs")
        written = await asyncio.to_thread(self.log.write, logged)
        if written:
            metric("intent_monitor_records").inc(written, tags={"outcome": "logged"})
        self.window.extend([r["inputs"] for r in records])
        metric("intent_monitor_records").inc(len(records), tags={"outcome": "scored"})
        metric("intent_drift_window").set(len(self.window))

    async def drift(self) -> dict[str, Any]:
        """``status`` (``ok``, ``drift``, ``warming_up``, ``no_reference``, ``no_traffic``), the
        window and, once it is full enough, every feature's PSI against the reference."""
        report: dict[str, Any] = {
            "window": len(self.window),
            "min_samples": self.knobs.min_samples,
            "statistic": "psi",
            "threshold": self.knobs.threshold,
            "reference": self.source,
        }
        if self.profile is None:
            return {**report, "status": "no_reference", "reason": self.reference_error}
        if not len(self.window):
            return {**report, "status": "no_traffic"}
        if len(self.window) < self.knobs.min_samples:
            return {**report, "status": "warming_up"}
        scores = await asyncio.to_thread(
            self.profile.score, self.window.frame(), self.knobs.threshold
        )
        worst = max((f["psi"] for f in scores["features"].values()), default=0.0)
        metric("intent_drift_score").set(worst, tags={"signal": "feature_psi_max"})
        metric("intent_drift_alarm").set(int(bool(scores["drifted"])), tags={"signal": "features"})
        status = "drift" if scores["drifted"] else "ok"
        return {**report, "status": status, **scores}
