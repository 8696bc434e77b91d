"""The offline pipeline: the Serve application's spec and classes, run as Ray Data stages.

``BatchPipeline.prepare`` reads the application from the same ``serve_config.yaml`` that Serve runs
(its ``args`` are the pipeline spec, its ``deployments`` the resources), and ``predictions()``
chains one ``map_batches`` per stage group (``spec.group_plans()``), each an actor pool of
:class:`batch.adapter.StageActor` running the group's stage classes in process. A job
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

from batch.adapter import stage_actor_class, stage_of_actor
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

    from servecore.pipeline.spec import PipelineSpec

logger = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4
"""Least read blocks per actor of the largest pool: a small file is otherwise one block, and one
block keeps one actor busy while the others idle."""
MIN_BLOCKS = 8
ROWS_PER_BLOCK = 512
"""Rows per read block for large inputs. A block crosses the stages as a unit, so its size sets how
long the first output waits for the pipeline to fill and how long the last block keeps one actor
busy while the others idle. Measured on 20,000 texts (2 CPUs), before :data:`CALLS_PER_ACTOR`:
512-row blocks ran at 0.89-0.90 of the plain loop in steady state, 256-row blocks at 0.70 (not
profiled; the per-block read and write tasks and six actor hops are the suspects), so not smaller.
With it, 512-row blocks run at 0.92-0.96."""
MAX_BLOCKS = 2000
CALLS_PER_ACTOR = 2
"""Ray Data calls each stage actor takes at once (``max_concurrent_calls_per_actor``). The model
still runs one batch at a time (Ray Data serialises the class's ``__call__``); the second call
fetches its input block and converts it to numpy batches, and turns the previous output into a
block, while torch (which releases the GIL) computes. With one call per actor that work sits between
two forward passes: on 10,000 texts (2 CPUs) the steady state went from 62 to 70-73 rows/s."""
BYTES_PER_ROW = 100
"""Estimate for CSV and JSON lines, whose row counts are unknown until read."""


def estimate_rows(paths: list[str], fmt: Format) -> int | None:
    """Rows of a local input, from parquet footers or the files' sizes; None if unknown."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        return sum(os.path.getsize(p) for p in paths) // BYTES_PER_ROW
    except (OSError, ValueError):
        return None  # remote URIs, unreadable footers: let Ray Data choose


def default_num_blocks(rows: int | None, files: int, max_actors: int) -> int | None:
    """Read blocks for a job, or None to keep one block per file (many files: enough already)."""
    wanted = max(MIN_BLOCKS, BLOCKS_PER_ACTOR * max_actors)
    if rows is not None:
        wanted = max(wanted, min(MAX_BLOCKS, -(-rows // ROWS_PER_BLOCK)))
    return wanted if files < wanted else None


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
    """Resource fields per group (or per stage name, meaning its group), e.g.
    ``{"Encoder": {"max_actors": 2}}``."""
    keep_text: bool = False
    keep_columns: tuple[str, ...] = ()
    """Intermediate columns carried to the output (``embedding`` for drift profiles)."""
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
    def prepare(cls, options: JobOptions, spec: PipelineSpec | None = None) -> BatchPipeline:
        """Validate the config and input, plan the stages and fit them to the connected cluster.

        ``spec`` replaces the application's own (a copy pinned to exact model versions)."""
        config = load_config(options.config)
        spec = spec or load_app_spec(options.config, options.app)
        entry = find_app(config, options.app)
        deployments = {d["name"]: d for d in entry.get("deployments") or [] if "name" in d}
        stages = plan_stages(
            spec,
            deployments,
            batch_size=options.batch_size,
            overrides=options.overrides,
            keep_text=options.keep_text,
            keep_columns=options.keep_columns,
        )
        adjustments: list[str] = []
        if options.fit_to_cluster:
            stages, adjustments = fit_to_cluster(stages, *free_resources())
            for note in adjustments:
                logger.warning("resources adjusted: %s", note)
        paths = expand_input(options.input)
        fmt = detect_format(paths)
        num_blocks = options.num_blocks
        if num_blocks is None:
            num_blocks = default_num_blocks(
                estimate_rows(paths, fmt), len(paths), max(s.resources.max_actors for s in stages)
            )
        return cls(options, paths, fmt, stages, adjustments, num_blocks)

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
                stage_actor_class(stage.name),
                fn_constructor_kwargs=stage.constructor_kwargs(),
                # A batch job has its whole backlog from the start: begin at the largest pool
                # (Serve's min_replicas is for idle traffic) and let Ray Data shrink it at the end.
                compute=ActorPoolStrategy(
                    min_size=r.min_actors,
                    max_size=r.max_actors,
                    initial_size=r.max_actors,
                    max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                ),
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


def stage_actors(stages: list[str], since: float) -> dict[str, dict[str, Any]]:
    """Where each stage's actors ran: ``{"Encoder": {"actors": 2, "restarts": 0, "nodes": [...]},
    ...}`` for this driver's actors started after ``since`` (a ``time.time()``).

    Read from the GCS actor table (Ray's internal ``state.actors()``: the public state API needs
    the dashboard, which a job's private cluster does not start). Best effort: on any failure the
    summary goes without it and says why in the log.
    """
    try:
        import ray
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        table = state.actors()
    except Exception as e:  # noqa: BLE001 - an internal API; the job's output does not depend on it
        logger.warning("could not read where the stage actors ran: %s", e)
        return {}
    since_ms = since * 1000.0 - 1000.0  # a second of slack for clocks read on other nodes
    found: dict[str, dict[str, Any]] = {}
    for actor in table.values():
        stage = stage_of_actor(actor.get("ActorClassName", ""), stages)
        if stage is None or actor.get("JobID") != job or actor.get("StartTime", 0) < since_ms:
            continue
        entry = found.setdefault(stage, {"actors": 0, "restarts": 0, "nodes": []})
        entry["actors"] += 1
        entry["restarts"] += int(actor.get("NumRestarts", 0))
        node = (actor.get("Address") or {}).get("NodeID")
        if node and node not in entry["nodes"]:
            entry["nodes"].append(node)
    return {name: found[name] for name in stages if name in found}


def write_text(path: str, text: str) -> None:
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


@dataclass(frozen=True)
class OutputFolder:
    """Where a job writes: ``predictions/``, ``rejects/`` (parquet) and ``summary.json``."""

    root: str
    predictions: str
    rejects: str
    summary: str
    write_args: dict[str, Any]
    """``write_parquet`` arguments: overwrite, tasks asking for :data:`TASK_CPUS`."""

    @classmethod
    def of(cls, options: JobOptions) -> OutputFolder:
        from ray.data import SaveMode

        if not options.output:
            raise ValueError("a batch job needs an output folder")
        root = options.output if "://" in options.output else os.path.abspath(options.output)
        write_args = {"mode": SaveMode.OVERWRITE, "ray_remote_args": {"num_cpus": TASK_CPUS}}
        return cls(
            root,
            _join(root, "predictions"),
            _join(root, "rejects"),
            _join(root, "summary.json"),
            write_args,
        )


def run_job(options: JobOptions, ray_startup_s: float = 0.0) -> dict[str, Any]:
    """Score ``options.input`` into ``options.output``; returns (and writes) the summary."""
    folder = OutputFolder.of(options)
    configure_progress(options.progress)
    pipeline = BatchPipeline.prepare(options)
    predictions_path, rejects_path = folder.predictions, folder.rejects
    write_args = folder.write_args
    logger.info(
        "scoring %d %s file(s) with stages %s",
        len(pipeline.paths),
        pipeline.fmt,
        [s.name for s in pipeline.stages],
    )

    started_at = time.time()
    started = time.perf_counter()
    pipeline.rejects().write_parquet(rejects_path, **write_args)
    rejects_s = time.perf_counter() - started
    pipeline.predictions().write_parquet(predictions_path, **write_args)
    elapsed_s = time.perf_counter() - started

    actors = stage_actors([s.name for s in pipeline.stages], started_at)
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
        "num_blocks": pipeline.num_blocks,
        "stage_actors": actors,
        "nodes_used": len({node for a in actors.values() for node in a["nodes"]}),
        "resource_adjustments": pipeline.adjustments,
        "predictions": predictions_path,
        "rejects": rejects_path,
        "summary": folder.summary,
    }
    write_text(summary["summary"], json.dumps(summary, indent=2) + "\n")
    return summary
