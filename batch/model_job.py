"""Batch inference for a generic model application (``graphs.model:build_app``): the same spec and
the same model class (:class:`deployments.pyfunc_model.PyfuncModel`) as the Serve application,
run as one Ray Data ``map_batches`` over an actor pool.

``python -m batch run --app breast-cancer --input rows.parquet --output /tmp/scored`` reads
parquet, CSV or JSON lines, checks every row against the model's signature (a row with a missing or
non-numeric value in a required column goes to ``rejects/`` with the reason, never into the model),
scores the rest on the exact version the alias names when the job starts (one version for the
whole job) and writes ``predictions/`` (the id column, every output column, ``model_version``) and
``summary.json``. ``python -m batch parity --app ... --url ...`` scores the same rows offline and
through the running application's ``/invocations`` and fails on any difference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from batch.inputs import detect_format, expand_input, read_table
from batch.pipeline import JobOptions, OutputFolder, _count_rows, configure_progress, write_text
from batch.plan import TASK_CPUS
from servecore.config_check import find_app, load_app_spec, load_config
from servecore.pipeline.model_spec import MODEL_STAGE, ModelAppSpec
from servecore.signature import NUMPY_OF_OIP, ModelSchema, named_outputs

logger = logging.getLogger("batch")

VERSION = "model_version"
REASON = "reason"


def is_model_app(config: str | os.PathLike[str], app: str) -> bool:
    """Whether ``app`` of the config is a generic model application."""
    return isinstance(load_app_spec(config, app), ModelAppSpec)


def rejection_reasons(frame: pd.DataFrame, schema: ModelSchema) -> pd.Series:
    """Per row, why it cannot be scored (None when it can): a required input missing or null,
    a number that is not one."""
    reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    for spec in schema.inputs:
        if spec.name not in frame.columns:
            if spec.required:
                reasons[reasons.isna()] = f"missing column {spec.name}"
            continue
        column = frame[spec.name]
        bad = column.isna() if spec.required else pd.Series(False, index=frame.index)
        if spec.datatype != "BYTES" and spec.datatype != "BOOL":
            # float64, not the column's own dtype: pyarrow-backed columns keep NaN apart from
            # null, and a coerced non-number is a NaN.
            numbers = pd.to_numeric(column.astype(object), errors="coerce").astype("float64")
            bad |= numbers.isna() & column.notna()
        reasons[bad & reasons.isna()] = f"{spec.name}: missing or not a number"
    return reasons


class ModelRows:
    """The Ray Data actor: the rows of one batch that pass the signature's checks, scored by
    :class:`~deployments.pyfunc_model.PyfuncModel` (the class Serve runs)."""

    def __init__(self, model_uri: str, id_column: str) -> None:
        from deployments.pyfunc_model import PyfuncModel

        self.model = PyfuncModel(model_uri=model_uri)
        self.version = f"{self.model.model_ref.name}/{self.model.model_ref.version}"
        self.id_column = id_column

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        schema = self.model.schema
        frame = frame[rejection_reasons(frame, schema).isna()]
        if frame.empty:
            return pd.DataFrame({self.id_column: pd.Series(dtype=object)})
        batch = {}
        for spec in schema.inputs:
            if spec.name in frame.columns:
                values = frame[spec.name].to_numpy()
                if spec.datatype not in ("BYTES", "BOOL"):
                    numbers = pd.to_numeric(frame[spec.name].astype(object))
                    values = numbers.to_numpy(NUMPY_OF_OIP[spec.datatype])
                batch[spec.name] = values
        outputs = named_outputs(self.model(batch), schema)
        out = pd.DataFrame({self.id_column: frame[self.id_column].to_numpy()})
        for name, column in outputs.items():
            out[name] = list(column) if column.ndim > 1 else column
        out[VERSION] = self.version
        return out


def rejected_rows(frame: pd.DataFrame, schema: dict[str, Any], id_column: str) -> pd.DataFrame:
    """The rows that cannot be scored, with the reason (``id``, ``reason``)."""
    reasons = rejection_reasons(frame, ModelSchema.from_dict(schema))
    kept = reasons.notna()
    return pd.DataFrame(
        {id_column: frame.loc[kept, id_column].to_numpy(), REASON: reasons[kept].to_numpy()}
    )


@dataclass
class ModelJob:
    options: JobOptions
    spec: ModelAppSpec
    pinned: str
    schema: ModelSchema
    max_actors: int
    num_cpus: float

    @classmethod
    def prepare(cls, options: JobOptions) -> ModelJob:
        from servecore.registry.client import resolve
        from servecore.traffic.model_core import load_version_info

        spec = load_app_spec(options.config, options.app)
        assert isinstance(spec, ModelAppSpec)
        ref = resolve(spec.model_uri)
        pinned = f"models:/{ref.name}/{ref.version}"
        schema = load_version_info(pinned).schema
        entry = find_app(load_config(options.config), options.app)
        deployment = next(
            (d for d in entry.get("deployments") or [] if d.get("name") == MODEL_STAGE), {}
        )
        scaling = deployment.get("autoscaling_config") or {}
        max_actors = int(scaling.get("max_replicas") or deployment.get("num_replicas") or 1)
        overrides = options.overrides.get(MODEL_STAGE, {})
        max_actors = int(overrides.get("max_actors", max_actors))
        cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus") or TASK_CPUS
        num_cpus = float(overrides.get("num_cpus", cpus))
        return cls(options, spec, pinned, schema, max(1, max_actors), num_cpus)

    def read(self) -> Any:
        paths = expand_input(self.options.input)
        dataset = read_table(paths, detect_format(paths), self.options.num_blocks)
        if self.options.id_column not in dataset.columns():
            raise ValueError(
                f"the input has no id column {self.options.id_column!r} (--id-column); "
                f"columns: {dataset.columns()}"
            )
        return dataset

    def predictions(self) -> Any:
        from ray.data import ActorPoolStrategy

        return self.read().map_batches(
            ModelRows,
            fn_constructor_kwargs={"model_uri": self.pinned, "id_column": self.options.id_column},
            compute=ActorPoolStrategy(min_size=1, max_size=self.max_actors),
            batch_size=self.options.batch_size,
            batch_format="pandas",
            num_cpus=self.num_cpus,
        )

    def rejects(self) -> Any:
        return self.read().map_batches(
            rejected_rows,
            fn_kwargs={"schema": self.schema.to_dict(), "id_column": self.options.id_column},
            batch_format="pandas",
            num_cpus=TASK_CPUS,
        )


def run_model_job(options: JobOptions, ray_startup_s: float = 0.0) -> dict[str, Any]:
    """Score ``options.input`` into ``options.output``; returns (and writes) the summary."""
    folder = OutputFolder.of(options)
    configure_progress(options.progress)
    job = ModelJob.prepare(options)
    started = time.perf_counter()
    job.rejects().write_parquet(folder.rejects, **folder.write_args)
    job.predictions().write_parquet(folder.predictions, **folder.write_args)
    elapsed = time.perf_counter() - started
    scored = _count_rows(folder.predictions)
    rejected = _count_rows(folder.rejects)
    summary: dict[str, Any] = {
        "app": options.app,
        "config": str(options.config),
        "input": options.input,
        "model": job.pinned,
        "rows_in": scored + rejected,
        "rows_scored": scored,
        "rows_rejected": rejected,
        "rows_per_second": round((scored + rejected) / elapsed, 1) if elapsed > 0 else None,
        "elapsed_s": round(elapsed, 2),
        "ray_startup_s": round(ray_startup_s, 2),
        "actors": {"max": job.max_actors, "num_cpus": job.num_cpus},
        "predictions": folder.predictions,
        "rejects": folder.rejects,
        "summary": folder.summary,
    }
    write_text(summary["summary"], json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class ModelParity:
    rows: int
    differences: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return not self.differences

    def format(self) -> str:
        head = f"{self.rows} rows compared, {len(self.differences)} differ"
        return "\n".join([head, *(json.dumps(d) for d in self.differences[:10])])


def run_model_parity(
    options: JobOptions, url: str, tolerance: float, timeout_s: float = 60.0, chunk: int = 256
) -> ModelParity:
    """The batch job's answers against the running application's ``/invocations`` (the same
    rows, in chunks): outputs must be equal (numbers within ``tolerance``)."""
    import httpx

    job = ModelJob.prepare(options)
    offline = job.predictions().to_pandas().sort_values(options.id_column)
    inputs = job.read().to_pandas().set_index(options.id_column).loc[offline[options.id_column]]
    names = [spec.name for spec in job.schema.inputs if spec.name in inputs.columns]
    prefix = find_app(load_config(options.config), options.app).get("route_prefix", "/")
    endpoint = f"{url.rstrip('/')}{prefix.rstrip('/')}/invocations"
    outputs = [c for c in offline.columns if c not in (options.id_column, VERSION)]
    differences: list[dict[str, Any]] = []
    with httpx.Client(timeout=timeout_s, trust_env=False) as client:
        for start in range(0, len(inputs), chunk):
            part = inputs.iloc[start : start + chunk][names]
            body = {"dataframe_split": json.loads(part.to_json(orient="split", index=False))}
            response = client.post(endpoint, json=body, headers={"Cache-Control": "no-cache"})
            response.raise_for_status()
            online = response.json()["predictions"]
            for i, answer in enumerate(online):
                row = offline.iloc[start + i]
                seen = answer if isinstance(answer, dict) else {outputs[0]: answer}
                for name in outputs:
                    if not _same(row[name], seen.get(name), tolerance):
                        differences.append(
                            {
                                "id": _plain(row[options.id_column]),
                                "output": name,
                                "batch": _plain(row[name]),
                                "online": seen.get(name),
                            }
                        )
    return ModelParity(len(offline), differences)


def _same(offline: Any, online: Any, tolerance: float) -> bool:
    if isinstance(offline, str | bytes) or isinstance(online, str):
        return str(offline) == str(online)
    try:
        return bool(
            np.allclose(np.asarray(offline, float), np.asarray(online, float), atol=tolerance)
        )
    except (TypeError, ValueError):
        return bool(offline == online)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
