"""Drift reference profiles, computed with Ray Data from the application's own pipeline.

``compute_reference`` pins the application's spec to the versions its aliases name right now, runs
the training split through the same batch pipeline as ``python -m batch run`` (the same classes,
one ``map_batches`` per stage), with the encoder's ``embedding`` column carried to the output, and
builds a :class:`servecore.monitoring.drift.ReferenceProfile` from the embeddings, the true labels
and the predicted labels. ``attach_reference`` stores it in MLflow as an artifact of a model
version's run (``drift/reference-<time>.json``) and tags every version of the release with its URI
(``drift_reference``), which is where the monitor deployment finds it for the encoder it serves.

The bootstrap calls this after it registers models; run it yourself after registering a version
by other means::

    python -m batch reference --config serve_config.yaml --app intent
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from servecore import LABELS
from servecore.monitoring.drift import (
    REFERENCE_ARTIFACT,
    REFERENCE_TAG,
    ReferenceProfile,
    build_profile,
)
from servecore.pipeline.spec import PipelineSpec
from servecore.registry.client import get_client, parse_model_uri
from servecore.traffic.releases import Release, spec_model_uris

logger = logging.getLogger(__name__)


def pin_spec(spec: PipelineSpec, release: Release) -> PipelineSpec:
    """A copy of ``spec`` whose every model URI names the exact version in ``release``."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: release.pin(v) if k == "model_uri" and isinstance(v, str) else walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return PipelineSpec.model_validate(walk(spec.model_dump()))


def compute_reference(
    config: str | Path,
    app: str,
    texts: list[str],
    labels: list[str],
    *,
    alias: str = "champion",
    progress: bool | None = False,
) -> ReferenceProfile:
    """Score ``texts`` (the training split) with the release behind ``alias`` on Ray Data.

    Needs a connected Ray (``batch.pipeline.connect_ray``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.pipeline import BatchPipeline, JobOptions, configure_progress
    from servecore.config_check import load_app_spec

    spec = load_app_spec(config, app)
    release = Release.resolve_variant(spec_model_uris(spec), alias)
    pinned = pin_spec(spec, release)
    encoder = pinned.encoder.model_uri
    configure_progress(progress)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="intent-reference-") as folder:
        path = Path(folder) / "train.parquet"
        ids = [str(i) for i in range(len(texts))]
        pq.write_table(pa.table({"id": ids, "text": texts}), path)
        options = JobOptions(
            input=str(path), config=config, app=app, keep_columns=("embedding",), progress=progress
        )
        dataset = BatchPipeline.prepare(options, spec=pinned).predictions()
        rows = dataset.select_columns(["id", "label", "embedding"]).take_all()
    if len(rows) != len(texts):
        raise RuntimeError(f"the pipeline scored {len(rows)} of {len(texts)} training texts")
    rows.sort(key=lambda row: int(row["id"]))
    embeddings = np.stack([np.asarray(row["embedding"], dtype=np.float32) for row in rows])
    predicted = [str(row["label"]) for row in rows]
    profile = build_profile(
        embeddings,
        labels,
        predicted,
        LABELS,
        release={ref.uri: f"{ref.name}/{ref.version}" for ref in release.refs},
        encoder=encoder,
    )
    logger.info(
        "reference profile of %s over %d texts in %.1fs (median similarity %.3f)",
        release.key,
        len(rows),
        time.perf_counter() - started,
        float(np.median(profile.similarity)),
    )
    return profile


def attach_reference(profile: ReferenceProfile, owner: str | None = None) -> str:
    """Store ``profile`` with the run of ``owner`` (``name/version``; default the encoder version)
    and tag every version of its release with the artifact URI, which is returned."""
    client = get_client()
    name, _, version = parse_model_uri(profile.encoder)
    owner_name, owner_version = owner.split("/", 1) if owner else (name, version)
    run_id = client.get_model_version(owner_name, str(owner_version)).run_id
    if not run_id:
        raise RuntimeError(f"{owner_name}/{owner_version} has no run to store a profile with")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    artifact_dir = str(Path(REFERENCE_ARTIFACT).parent)
    file_name = f"{Path(REFERENCE_ARTIFACT).stem}-{stamp}.json"
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / file_name
        local.write_text(profile.model_dump_json())
        client.log_artifact(run_id, str(local), artifact_path=artifact_dir)
    uri = f"runs:/{run_id}/{artifact_dir}/{file_name}"
    tagged = {value for value in profile.release.values()}
    for item in sorted(tagged | {f"{name}/{version}"}):
        model, model_version = item.split("/", 1)
        client.set_model_version_tag(model, model_version, REFERENCE_TAG, uri)
    logger.info("reference profile stored as %s, tagged on %s", uri, sorted(tagged))
    return uri


def load_reference(encoder_uri: str) -> ReferenceProfile | None:
    """The profile tagged on a pinned encoder version (``models:/name/3``), None if it has none."""
    import mlflow

    client = get_client()
    name, _, version = parse_model_uri(encoder_uri)
    if version is None:
        raise ValueError(f"{encoder_uri} is not pinned to a version")
    uri = client.get_model_version(name, version).tags.get(REFERENCE_TAG)
    if not uri:
        return None
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        return ReferenceProfile.model_validate(json.loads(Path(local).read_text()))


def has_reference(spec: PipelineSpec, alias: str = "champion") -> bool:
    """Whether the encoder behind ``alias`` already has a profile."""
    release = Release.resolve_variant(spec_model_uris(spec), alias)
    ref = next(r for r in release.refs if r.uri == spec.encoder.model_uri)
    client = get_client()
    return bool(client.get_model_version(ref.name, ref.version).tags.get(REFERENCE_TAG))


def ensure_reference(
    config: str | Path,
    app: str,
    texts: list[str],
    labels: list[str],
    *,
    alias: str = "champion",
    force: bool = False,
) -> str | None:
    """Compute and attach the profile of the release behind ``alias`` unless its encoder version
    has one (or ``force``). Starts a private local Ray when none is connected, and stops it after.
    Returns the artifact URI, or None when nothing had to be done."""
    import ray

    from batch.pipeline import connect_ray
    from servecore.config_check import load_app_spec

    if not force and has_reference(load_app_spec(config, app), alias):
        logger.info("the encoder behind @%s already has a drift reference profile", alias)
        return None
    started_ray, _ = connect_ray()
    try:
        profile = compute_reference(config, app, texts, labels, alias=alias)
        return attach_reference(profile)
    finally:
        if started_ray:
            ray.shutdown()
