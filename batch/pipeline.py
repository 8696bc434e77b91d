"""The offline pipeline: the Serve application's spec and classes, run as Ray Data stages.

``BatchPipeline.prepare`` reads the application from the same ``serve_config.yaml`` that Serve runs
(its ``args`` are the pipeline spec, its ``deployments`` the resources), and ``predictions()``
chains one ``map_batches`` per ``spec.stage_plans()`` entry, each an actor pool of
:class:`batch.adapter.StageActor` built from the stage's class path and constructor kwargs. A job
(:func:`run_job`) makes two passes over the input: one writes the rows that cannot be scored to
``rejects/``, the other scores the rest into ``predictions/``; both use the same row sorter, so
the two always add up to the input.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.adapter import StageActor
from batch.inputs import Format, detect_format, expand_input, read_input, selected
from batch.plan import (
    DEFAULT_BATCH_SIZE,
    TASK_CPUS,
    VERSIONS,
    BatchStage,
    fit_to_cluster,
    plan_stages,
)
from servecore.config_check import find_app, load_app_spec, load_config

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4
"""Default read blocks per actor of the largest pool: a small file is otherwise one block, and one
block keeps one actor busy while the others idle."""
MIN_BLOCKS = 8


@dataclass
class JobOptions:
    """Everything a batch job needs; the CLI flags map one to one."""

    input: str
    config: str | Path = "serve_config.yaml"
    app: str = "intent"
    output: str | None = None
    text_column: str = "text"
    id_column: str = "id"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_blocks: int | None = None
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per stage (deployment name) resource fields, e.g. ``{"Encoder": {"max_actors": 2}}``."""
    keep_text: bool = False
    fit_to_cluster: bool = True
    progress: bool | None = None
    """Ray Data progress bars; None shows them when stdout is a terminal."""


def free_resources(settle_s: float = 5.0) -> tuple[float, float]:
    """(CPUs, GPUs) free in the connected cluster, once they stop rising.

    Actors of a job that just ended release their CPUs a moment after it returns; reading too
    early would fit the next job into a cluster that looks fuller than it is.
    """
    import ray

    deadline = time.monotonic() + settle_s
    previous = ray.available_resources()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = ray.available_resources()
        if current.get("CPU", 0.0) <= previous.get("CPU", 0.0):
            previous = current
            break
        previous = current
    return previous.get("CPU", 0.0), previous.get("GPU", 0.0)


@dataclass
class BatchPipeline:
    """A prepared job: the input files, their format and the fitted stages."""

    options: JobOptions
    paths: list[str]
    fmt: Format
    stages: list[BatchStage]
    adjustments: list[str]
    num_blocks: int | None

    @classmethod
    def prepare(cls, options: JobOptions) -> BatchPipeline:
        """Validate the config and input, plan the stages and fit them to the connected cluster."""
        config = load_config(options.config)
        spec = load_app_spec(options.config, options.app)
        entry = find_app(config, options.app)
        deployments = {d["name"]: d for d in entry.get("deployments") or [] if "name" in d}
        stages = plan_stages(
            spec,
            deployments,
            batch_size=options.batch_size,
            overrides=options.overrides,
            keep_text=options.keep_text,
        )
        adjustments: list[str] = []
        if options.fit_to_cluster:
            stages, adjustments = fit_to_cluster(stages, *free_resources())
            for note in adjustments:
                logger.warning("resources adjusted: %s", note)
        paths = expand_input(options.input)
        num_blocks = options.num_blocks
        if num_blocks is None:
            wanted = max(MIN_BLOCKS, BLOCKS_PER_ACTOR * max(s.resources.max_actors for s in stages))
            # Many files already give Ray Data enough blocks; merging them would lose parallelism.
            num_blocks = wanted if len(paths) < wanted else None
        return cls(options, paths, detect_format(paths), stages, adjustments, num_blocks)

    def _read(self) -> Dataset:
        return read_input(self.paths, self.fmt, self.options.text_column, self.num_blocks)

    def valid_rows(self) -> Dataset:
        """``id``, ``text`` of every row that can be scored."""
        o = self.options
        return selected(self._read(), self.fmt, o.text_column, o.id_column, "valid")

    def rejects(self) -> Dataset:
        """``id``, ``raw``, ``reason`` of every row that cannot."""
        o = self.options
        return selected(self._read(), self.fmt, o.text_column, o.id_column, "rejected")

    def predictions(self) -> Dataset:
        """The scored rows: ``id``, ``label``, ``prob_<label>`` each, ``model_versions``."""
        from ray.data import ActorPoolStrategy

        dataset = self.valid_rows()
        for stage in self.stages:
            r = stage.resources
            dataset = dataset.map_batches(
                StageActor,
                fn_constructor_kwargs=stage.constructor_kwargs(),
                compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
                batch_size=r.batch_size,
                batch_format="numpy",
                num_cpus=r.num_cpus,
                num_gpus=r.num_gpus,
            )
        return dataset

    def describe(self) -> list[dict[str, Any]]:
        return [{"stage": s.name, **asdict(s.resources)} for s in self.stages]


def connect_ray(address: str | None = None) -> tuple[bool, float]:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a private local cluster.

    Returns (whether this call started or joined Ray, seconds it took). A process that is already
    connected (a test session, a notebook) is left as it is.
    """
    import ray

    if ray.is_initialized():
        return False, 0.0
    started = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local" never attaches to a cluster that `ray start` left running on this machine.
        ray.init(address="local", include_dashboard=False)
    return True, time.perf_counter() - started


def configure_progress(progress: bool | None) -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = (
        sys.stdout.isatty() if progress is None else progress
    )


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name) if "://" in base else os.path.join(base, name)


def _parquet_dataset(path: str) -> Any | None:
    import pyarrow.dataset as pds

    try:
        return pds.dataset(path, format="parquet")
    except (FileNotFoundError, OSError):
        return None


def _count_rows(path: str) -> int:
    data = _parquet_dataset(path)
    return 0 if data is None else int(data.count_rows())


def _column_counts(path: str, column: str) -> dict[str, int]:
    data = _parquet_dataset(path)
    if data is None:
        return {}
    values = data.to_table(columns=[column]).column(column).to_pylist()
    return dict(sorted(Counter(values).items()))


def versions_by_stage(version_sets: Mapping[str, int]) -> dict[str, str | list[str]]:
    """``{"Tokenizer=m/1,Encoder=m/1": n, ...}`` → ``{"Tokenizer": "m/1", ...}``; a stage whose
    version changed during the job (an alias moved) lists every version seen."""
    seen: dict[str, set[str]] = {}
    for versions in version_sets:
        for item in filter(None, versions.split(",")):
            stage, _, version = item.partition("=")
            seen.setdefault(stage, set()).add(version)
    return {
        stage: next(iter(found)) if len(found) == 1 else sorted(found)
        for stage, found in seen.items()
    }


def write_text(path: str, text: str) -> None:
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def run_job(options: JobOptions, ray_startup_s: float = 0.0) -> dict[str, Any]:
    """Score ``options.input`` into ``options.output``; returns (and writes) the summary."""
    from ray.data import SaveMode

    if not options.output:
        raise ValueError("a batch job needs an output folder")
    configure_progress(options.progress)
    pipeline = BatchPipeline.prepare(options)
    output = options.output if "://" in options.output else os.path.abspath(options.output)
    predictions_path = _join(output, "predictions")
    rejects_path = _join(output, "rejects")
    write_args: dict[str, Any] = {
        "mode": SaveMode.OVERWRITE,
        "ray_remote_args": {"num_cpus": TASK_CPUS},
    }
    logger.info(
        "scoring %d %s file(s) with stages %s",
        len(pipeline.paths),
        pipeline.fmt,
        [s.name for s in pipeline.stages],
    )

    started = time.perf_counter()
    pipeline.rejects().write_parquet(rejects_path, **write_args)
    rejects_s = time.perf_counter() - started
    pipeline.predictions().write_parquet(predictions_path, **write_args)
    elapsed_s = time.perf_counter() - started

    scored = _count_rows(predictions_path)
    by_reason = _column_counts(rejects_path, "reason")
    rejected = sum(by_reason.values())
    rows_in = scored + rejected
    summary: dict[str, Any] = {
        "app": options.app,
        "config": str(options.config),
        "input": options.input,
        "format": pipeline.fmt,
        "rows_in": rows_in,
        "rows_scored": scored,
        "rows_rejected": rejected,
        "rejected_by_reason": by_reason,
        "rows_per_second": round(rows_in / elapsed_s, 1) if elapsed_s > 0 else None,
        "elapsed_s": round(elapsed_s, 2),
        "scoring_s": round(elapsed_s - rejects_s, 2),
        "rejects_s": round(rejects_s, 2),
        "ray_startup_s": round(ray_startup_s, 2),
        "model_versions": versions_by_stage(_column_counts(predictions_path, VERSIONS)),
        "stages": pipeline.describe(),
        "resource_adjustments": pipeline.adjustments,
        "predictions": predictions_path,
        "rejects": rejects_path,
        "summary": _join(output, "summary.json"),
    }
    write_text(summary["summary"], json.dumps(summary, indent=2) + "\n")
    return summary
