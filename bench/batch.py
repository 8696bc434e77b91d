"""``python -m bench.batch``: the offline batch job on Ray Data against a plain loop, in one run.

The batch path (:func:`batch.pipeline.run_job`) wraps the same model classes that
:class:`bench.pipeline.InProcessPipeline` calls directly, so the plain loop is what the job would
cost without Ray; the ratio of the two is Ray Data's overhead. The target is stated *excluding
start-up*: for the plain loop that is loading its models, for Ray Data it is ``ray.init`` plus the
pipeline fill (actor processes starting, each loading its model, the first block crossing every
stage), which costs the same whether the job scores 20 thousand rows or 20 million. So the headline
is Ray Data's steady-state rate against the plain loop's scoring rate, and the whole job against the
plain loop with its model load is reported beside it, with the fill time on its own line.

Order, and why:

1. The input: ``--texts`` texts cycled from ``data/intents.csv`` (every split), a unique string id
   per row, written to one parquet file, as a user hands a job one file.
2. The plain loop, in this process and before Ray starts, so Ray's own processes do not compete
   for the cores: model load timed apart from read + score + write.
3. Ray: ``ray.init`` timed on its own, then ``run_job`` timed as a whole, then ``ray.shutdown()``.
   The job splits the input into blocks as it does for users (one per 512 rows); each block
   becomes one output file, and the files' modification times give a steady-state rate that
   leaves out the pipeline fill (actors starting, models loading, the first block crossing every
   stage).
4. The two outputs must agree (ids, labels, probabilities within ``1e-5``, model versions); a
   disagreement turns the exit status to 1, like a section that fails.

Options: ``--texts N`` (default 20,000), ``--quick`` (2,000), ``--config PATH`` (default
``serve_config.yaml``), ``--output DIR`` (default ``bench/results``: ``batch-<timestamp>.json`` and
``batch-latest.json``), ``--num-blocks`` and ``--keep-files`` for investigating a result.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.adapter import output_columns, probability_column
from batch.parity import DEFAULT_TOLERANCE
from batch.plan import DEFAULT_BATCH_SIZE, ID, TEXT, VERSIONS
from bench import report as reporting
from bench.run import repeat_to
from servecore import LABELS

logger = logging.getLogger("bench.batch")

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
FULL_TEXTS = 20_000
QUICK_TEXTS = 2_000
HEADLINE_TARGET = 0.95
"""Issue 15: the steady state at least 0.95 of the plain loop (0.90 before)."""
MIN_STEADY_FILES = 3
"""Output files needed for a steady-state rate: the first is left out as the pipeline fill, and
two intervals are the least that says anything."""

PLAIN_SCORING = "plain_scoring"
PLAIN_WITH_LOAD = "plain_with_load"
RAY_JOB = "ray_job"
RAY_STEADY = "ray_steady"
ROW_TITLES: dict[str, str] = {
    PLAIN_SCORING: "plain loop (scoring only: read, score, write)",
    PLAIN_WITH_LOAD: "plain loop (incl. model load)",
    RAY_JOB: "Ray Data job (excl. Ray start-up; incl. actor start + model load)",
    RAY_STEADY: "Ray Data steady state (output files after the first)",
}


# --- input -------------------------------------------------------------------------------------


def dataset_texts(path: Path) -> list[str]:
    """Every text of the dataset file, all splits, in file order."""
    with open(path, newline="") as f:
        return [row[TEXT] for row in csv.DictReader(f)]


def input_table(texts: Sequence[str], count: int) -> pa.Table:
    """``count`` rows of ``texts`` cycled in order, each with its own string id."""
    width = len(str(max(count - 1, 0)))
    return pa.table(
        {
            ID: pa.array([f"row-{i:0{width}d}" for i in range(count)], type=pa.string()),
            TEXT: pa.array(repeat_to(texts, count), type=pa.string()),
        }
    )


def write_input(texts: Sequence[str], count: int, path: Path) -> Path:
    """The benchmark's input as one parquet file: the job is handed a single file, and splitting
    it into blocks is its own business."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(input_table(texts, count), path)
    return path


# --- measurements ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    rows: int
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "seconds": self.seconds,
            "rows_per_s": self.rows_per_s,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SteadyState:
    """Rows per second between the first and the last output file (see :func:`steady_state`)."""

    files: int
    rows: int
    """Rows in the files after the first one."""
    seconds: float | None
    note: str | None = None
    """Why there is no rate, when there is none."""

    @property
    def rows_per_s(self) -> float | None:
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.rows / self.seconds


def steady_state(files: Sequence[tuple[float, int]]) -> SteadyState:
    """The rate from ``(mtime, rows)`` of every output file.

    Each file is one block finished. The first file marks the end of the pipeline fill (actors
    started, models loaded, one block through every stage), so its rows are left out and the rate
    is the rows of the later files over the time from the first file to the last.
    """
    ordered = sorted(files)
    if len(ordered) < MIN_STEADY_FILES:
        return SteadyState(
            files=len(ordered),
            rows=0,
            seconds=None,
            note=f"only {len(ordered)} output file(s); a steady-state rate needs "
            f"{MIN_STEADY_FILES} or more",
        )
    rows = sum(count for _, count in ordered[1:])
    seconds = ordered[-1][0] - ordered[0][0]
    if seconds <= 0:
        return SteadyState(len(ordered), rows, None, "every output file has the same mtime")
    return SteadyState(len(ordered), rows, seconds)


def output_files(directory: Path) -> list[tuple[float, int]]:
    """``(mtime, rows)`` of every parquet file under ``directory``."""
    return [
        (path.stat().st_mtime, pq.ParquetFile(path).metadata.num_rows)
        for path in sorted(directory.rglob("*.parquet"))
    ]


@dataclass
class PlainResult:
    rows: int
    load_s: float
    scoring_s: float
    model_versions: dict[str, str]
    """Registered version per stage, as the job's summary reports them (``{"Encoder": "m/3"}``)."""
    labels: tuple[str, ...]
    stage_seconds: dict[str, float]

    def measurements(self) -> dict[str, Measurement]:
        share = {k: v / self.scoring_s for k, v in self.stage_seconds.items()}
        return {
            PLAIN_SCORING: Measurement(self.rows, self.scoring_s, {"stage_share": share}),
            PLAIN_WITH_LOAD: Measurement(
                self.rows, self.load_s + self.scoring_s, {"model_load_s": self.load_s}
            ),
        }


def run_plain(config: Path, input_path: Path, output_path: Path, batch_size: int) -> PlainResult:
    """The model classes chained in this process, ``batch_size`` texts a call, no Ray at all."""
    from bench.pipeline import InProcessPipeline, load_spec

    started = time.perf_counter()
    pipeline = InProcessPipeline(load_spec(config))
    load_s = time.perf_counter() - started
    logger.info("plain loop: models loaded in %.1fs", load_s)
    versions = {m["stage"]: f"{m['name']}/{m['version']}" for m in pipeline.models()}
    version_text = ",".join(f"{stage}={version}" for stage, version in versions.items())
    # The ensemble's label order, as batch.adapter.StageActor takes it for the job's columns.
    labels = tuple(getattr(pipeline.model(pipeline.order[-1]), "labels", LABELS))

    stage_seconds: dict[str, float] = {}
    started = time.perf_counter()
    table = pq.read_table(input_path, columns=[ID, TEXT])
    ids = table.column(ID).to_numpy(zero_copy_only=False)
    texts = table.column(TEXT).to_pylist()
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        scored = pipeline(chunk, stage_seconds)
        batch = {
            ID: ids[start : start + len(chunk)],
            "probs": scored["probs"],
            "label": scored["label"],
            VERSIONS: np.full(len(chunk), version_text, dtype=object),
        }
        parts.append(output_columns(batch, labels, keep_text=False))
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}
    pq.write_table(
        pa.table({name: pa.array(values) for name, values in columns.items()}), output_path
    )
    scoring_s = time.perf_counter() - started
    logger.info("plain loop: %d rows scored and written in %.1fs", len(texts), scoring_s)
    del pipeline
    gc.collect()
    return PlainResult(len(texts), load_s, scoring_s, versions, labels, stage_seconds)


@dataclass
class RayResult:
    startup_s: float
    job_s: float
    summary: dict[str, Any]
    steady: SteadyState
    first_file_after_s: float | None
    """Seconds from calling ``run_job`` to the first predictions file: the rejects pass, planning,
    actor start-up, model load and the first block through every stage."""

    def measurements(self) -> dict[str, Measurement]:
        rows = int(self.summary["rows_in"])
        elapsed = float(self.summary["elapsed_s"])
        detail = {
            "rejects_pass_s": self.summary["rejects_s"],
            "predictions_pass_s": self.summary["scoring_s"],
            "outside_passes_s": self.job_s - elapsed,
            "first_file_after_s": self.first_file_after_s,
            "output_files": self.steady.files,
            "rows_scored": self.summary["rows_scored"],
            "rows_rejected": self.summary["rows_rejected"],
            "stages": self.summary["stages"],
            "resource_adjustments": self.summary["resource_adjustments"],
        }
        found = {RAY_JOB: Measurement(rows, self.job_s, detail)}
        if self.steady.seconds is not None and self.steady.rows_per_s is not None:
            found[RAY_STEADY] = Measurement(
                self.steady.rows, self.steady.seconds, {"files": self.steady.files}
            )
        return found


def run_ray(config: Path, input_path: Path, output_dir: Path, num_blocks: int | None) -> RayResult:
    """A private local Ray cluster, the real batch job on it, then the cluster shut down."""
    # Nothing outside this process talks to the cluster; keep token auth out of the way.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from batch.pipeline import JobOptions, run_job

    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False)
    startup_s = time.perf_counter() - started
    logger.info("Ray started in %.1fs", startup_s)
    try:
        options = JobOptions(
            input=str(input_path),
            config=config,
            output=str(output_dir),
            num_blocks=num_blocks,
            progress=False,
        )
        job_started_unix = time.time()
        started = time.perf_counter()
        summary = run_job(options, ray_startup_s=startup_s)
        job_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    files = output_files(Path(summary["predictions"]))
    first = min((mtime for mtime, _ in files), default=None)
    logger.info(
        "Ray Data job: %d rows in %.1fs, %d output files", summary["rows_in"], job_s, len(files)
    )
    return RayResult(
        startup_s=startup_s,
        job_s=job_s,
        summary=summary,
        steady=steady_state(files),
        first_file_after_s=None if first is None else first - job_started_unix,
    )


# --- agreement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Whether the plain loop and the Ray Data job wrote the same predictions."""

    rows: int
    missing_ids: int
    """Ids the plain loop scored and the job did not."""
    unexpected_ids: int
    """Ids the job wrote that the plain loop did not (or wrote twice)."""
    label_mismatches: int | None
    max_abs_diff: float | None
    tolerance: float
    versions_match: bool

    @property
    def ids_match(self) -> bool:
        return self.missing_ids == 0 and self.unexpected_ids == 0

    @property
    def ok(self) -> bool:
        return (
            self.ids_match
            and self.label_mismatches == 0
            and self.max_abs_diff is not None
            and self.max_abs_diff <= self.tolerance
            and self.versions_match
        )

    def format(self) -> str:
        verdict = "AGREE" if self.ok else "DIFFER"
        if not self.ids_match:
            return (
                f"outputs {verdict}: {self.missing_ids} ids missing from the Ray Data output, "
                f"{self.unexpected_ids} unexpected or repeated"
            )
        diff = "–" if self.max_abs_diff is None else f"{self.max_abs_diff:.2g}"
        versions = "same model versions" if self.versions_match else "DIFFERENT model versions"
        return (
            f"outputs {verdict}: {self.rows} ids on both sides, {self.label_mismatches} label "
            f"mismatches, max |probability difference| {diff} (allowed {self.tolerance:g}), "
            f"{versions}"
        )


def compare_outputs(
    plain: pa.Table,
    ray: pa.Table,
    labels: Sequence[str],
    tolerance: float = DEFAULT_TOLERANCE,
    versions_match: bool = True,
) -> Agreement:
    """Row by row, matched on ``id``: labels equal, every ``prob_<label>`` within ``tolerance``."""
    plain_ids = plain.column(ID).to_pylist()
    ray_ids = ray.column(ID).to_pylist()
    missing = len(set(plain_ids) - set(ray_ids))
    unexpected = len(set(ray_ids) - set(plain_ids)) + (len(ray_ids) - len(set(ray_ids)))
    if missing or unexpected:
        return Agreement(len(plain_ids), missing, unexpected, None, None, tolerance, versions_match)
    plain, ray = plain.sort_by(ID), ray.sort_by(ID)
    label_mismatches = sum(
        a != b
        for a, b in zip(
            plain.column("label").to_pylist(), ray.column("label").to_pylist(), strict=True
        )
    )
    columns = [probability_column(label) for label in labels]

    def probs(table: pa.Table) -> np.ndarray:
        return np.column_stack([table.column(c).to_numpy() for c in columns]).astype(np.float64)

    diffs = np.abs(probs(plain) - probs(ray))
    max_abs_diff = float(diffs.max()) if diffs.size else 0.0
    return Agreement(
        len(plain_ids), 0, 0, label_mismatches, max_abs_diff, tolerance, versions_match
    )


# --- ratios and the report ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    key: str
    title: str
    numerator: str
    denominator: str
    target: float | None


RATIOS = (
    Ratio(
        "headline",
        "Ray Data steady state ÷ plain loop scoring only (start-up left out on both sides)",
        RAY_STEADY,
        PLAIN_SCORING,
        HEADLINE_TARGET,
    ),
    Ratio(
        "end_to_end",
        "Ray Data job ÷ plain loop incl. model load (only ray.init left out)",
        RAY_JOB,
        PLAIN_WITH_LOAD,
        None,
    ),
    Ratio("strict", "Ray Data job ÷ plain loop scoring only", RAY_JOB, PLAIN_SCORING, None),
)


def verdict(value: float | None, target: float | None, outputs_agree: bool) -> str:
    """``MET`` only when the ratio clears the target and the two sides wrote the same output."""
    if value is None:
        return "n/a (not measured)"
    if target is None:
        return "(no target)"
    if not outputs_agree:
        return "NOT MET (outputs differ)"
    return "MET" if value >= target else "NOT MET"


def compute_ratios(
    rates: Mapping[str, float | None], outputs_agree: bool
) -> dict[str, dict[str, Any]]:
    """Every :data:`RATIOS` entry from rows per second by measurement key."""
    out: dict[str, dict[str, Any]] = {}
    for ratio in RATIOS:
        top, bottom = rates.get(ratio.numerator), rates.get(ratio.denominator)
        value = top / bottom if top is not None and bottom else None
        text = verdict(value, ratio.target, outputs_agree)
        out[ratio.key] = reporting.ratio_entry(ratio, value, text, "MET")
    return out


def markdown_table(results: Mapping[str, Mapping[str, Any]], notes: Mapping[str, str]) -> str:
    lines = ["| Measurement | Rows | Seconds | Rows/s |", "|---|---:|---:|---:|"]
    for key, title in ROW_TITLES.items():
        row = results.get(key)
        if row is None:
            lines.append(f"| {title} | – | – | {notes.get(key, 'not measured')} |")
            continue
        rate = "–" if row["rows_per_s"] is None else f"{row['rows_per_s']:.1f}"
        lines.append(f"| {title} | {row['rows']} | {row['seconds']:.2f} | {rate} |")
    return "\n".join(lines)


def time_notes(report: Mapping[str, Any]) -> list[str]:
    """Where the time went on each side, and whether the machine was quiet."""
    notes = []
    results = report["results"]
    plain = results.get(PLAIN_SCORING)
    loaded = results.get(PLAIN_WITH_LOAD)
    if plain and loaded:
        share = ", ".join(
            f"{stage} {part:.0%}" for stage, part in plain["detail"]["stage_share"].items()
        )
        notes.append(
            f"Plain loop: model load {loaded['detail']['model_load_s']:.1f} s; scoring time by "
            f"stage: {share}."
        )
    job = results.get(RAY_JOB)
    if job:
        d = job["detail"]
        first = d["first_file_after_s"]
        first_text = "" if first is None else f"; first predictions file {first:.1f} s after start"
        notes.append(
            f"Ray Data job: rejects pass {d['rejects_pass_s']:.1f} s, predictions pass "
            f"{d['predictions_pass_s']:.1f} s, planning/counting/summary "
            f"{d['outside_passes_s']:.1f} s{first_text}; {d['output_files']} output files."
        )
        pools = "; ".join(
            f"{s['stage']} {s['min_actors']}–{s['max_actors']} × {s['num_cpus']:g} CPU"
            for s in d["stages"]
        )
        notes.append(f"Actor pools: {pools}.")
        for adjustment in d["resource_adjustments"]:
            notes.append(f"Resources adjusted: {adjustment}.")
    machine = report["machine"]
    load = machine.get("loadavg_start")
    cpus = machine.get("cpus_available") or 1
    if load and load[0] > reporting.BUSY_LOAD_PER_CPU * cpus:
        notes.append(
            f"**The machine was busy** (1-minute load average {load[0]} on {cpus} CPUs at the "
            "start): compare with a run on an idle machine."
        )
    return notes


def render(report: Mapping[str, Any]) -> str:
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    parts = [
        f"## Batch benchmark ({report['mode']}, {report['texts']} texts, "
        f"{report['started_at']}, {report['duration_s']:.0f}s)",
        "",
        f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), torch threads "
        f"{machine['torch_threads']}, load average at start {machine['loadavg_start']}, at end "
        f"{machine.get('loadavg_end')}; {versions}.",
        "",
        markdown_table(report["results"], report.get("row_notes", {})),
        "",
    ]
    startup = report.get("ray_startup_s")
    parts.append(
        "Ray start-up (`ray.init`, in no row above): "
        + ("not measured" if startup is None else f"{startup:.2f} s")
    )
    parts += ["", reporting.markdown_ratios(report["ratios"], bold_targets=True), ""]
    agreement = report.get("agreement")
    parts.append(agreement["text"] if agreement else "outputs not compared")
    notes = time_notes(report)
    if notes:
        parts += ["", *(f"- {note}" for note in notes)]
    if report["failures"]:
        parts += ["", "**Sections that failed:**", ""]
        parts += [f"- {f['section']}: {f['error']}" for f in report["failures"]]
    return "\n".join(parts) + "\n"


def write_json(report: Mapping[str, Any], output_dir: Path) -> list[Path]:
    """``batch-latest.json`` and ``batch-YYYYmmdd-HHMMSS.json`` in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(report["started_unix"]))
    text = json.dumps(report, indent=2, default=str) + "\n"
    paths = [output_dir / "batch-latest.json", output_dir / f"batch-{stamp}.json"]
    for path in paths:
        path.write_text(text)
    return paths


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch",
        description="Benchmark the Ray Data batch job against a plain in-process loop.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--texts", type=int, default=FULL_TEXTS, help="rows to score (default: %(default)s)"
    )
    size.add_argument("--quick", action="store_true", help=f"{QUICK_TEXTS} rows, for a smoke test")
    reporting.add_common_arguments(parser, "batch-latest.json")
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="blocks the job splits the input into (default: the job's own default, as users "
        "get it: one per 512 rows)",
    )
    parser.add_argument(
        "--keep-files", action="store_true", help="keep the input and both outputs afterwards"
    )
    args = parser.parse_args(argv)
    if args.texts < 1:
        parser.error("--texts must be at least 1")
    return args


def attempt(name: str, section: Callable[[], T], failures: list[dict[str, str]]) -> T | None:
    """``section()``; a failure is logged and recorded, and the run goes on without its result."""
    logger.info("== %s", name)
    try:
        return section()
    except Exception as e:  # noqa: BLE001 - recorded, reported, fails the run at the end
        logger.exception("section %r failed", name)
        failures.append({"section": name, "error": f"{type(e).__name__}: {e}"})
        return None


def agree(plain: PlainResult, plain_output: Path, ray_result: RayResult) -> Agreement:
    """Compare the two outputs, and the model versions each side ran."""
    agreement = compare_outputs(
        pq.read_table(plain_output),
        pq.read_table(ray_result.summary["predictions"]),
        plain.labels,
        versions_match=plain.model_versions == ray_result.summary["model_versions"],
    )
    logger.info("%s", agreement.format())
    return agreement


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from servecore.dataset import dataset_path

    count = QUICK_TEXTS if args.quick else args.texts
    num_blocks: int | None = args.num_blocks
    config = args.config.resolve()
    started_unix = time.time()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else ("full" if count == FULL_TEXTS else "custom"),
        "started_at": datetime.datetime.fromtimestamp(started_unix).isoformat(timespec="seconds"),
        "started_unix": started_unix,
        "config": str(config),
        "texts": count,
        "batch_size": DEFAULT_BATCH_SIZE,
        "num_blocks": num_blocks,
        "machine": reporting.machine_facts(),
        "results": {},
        "row_notes": {},
        "ray_startup_s": None,
        "steady_state": None,
        "ray_summary": None,
        "agreement": None,
        "failures": [],
    }
    failures: list[dict[str, str]] = report["failures"]
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    input_path = work / "input" / "texts.parquet"
    plain_output = work / "plain.parquet"
    logger.info("batch benchmark: %d texts, blocks %s, files in %s", count, num_blocks, work)
    try:
        written = attempt(
            "input", lambda: write_input(dataset_texts(dataset_path()), count, input_path), failures
        )
        plain: PlainResult | None = None
        ray_result: RayResult | None = None
        if written is not None:
            # The plain loop first: Ray is not started yet, so nothing competes with it.
            plain = attempt(
                "plain loop",
                lambda: run_plain(config, input_path, plain_output, DEFAULT_BATCH_SIZE),
                failures,
            )
            ray_result = attempt(
                "Ray Data job",
                lambda: run_ray(config, input_path, work / "ray", num_blocks),
                failures,
            )
        if plain is not None:
            report["results"].update({k: m.to_dict() for k, m in plain.measurements().items()})
        if ray_result is not None:
            report["ray_startup_s"] = ray_result.startup_s
            report["ray_summary"] = ray_result.summary
            steady = ray_result.steady
            report["steady_state"] = {**asdict(steady), "rows_per_s": steady.rows_per_s}
            if steady.note:
                report["row_notes"][RAY_STEADY] = steady.note
            report["results"].update({k: m.to_dict() for k, m in ray_result.measurements().items()})
        if plain is not None and ray_result is not None:
            done, result = plain, ray_result
            agreement = attempt("agreement", lambda: agree(done, plain_output, result), failures)
            if agreement is not None:
                report["agreement"] = {
                    **asdict(agreement),
                    "ok": agreement.ok,
                    "text": agreement.format(),
                }
    finally:
        if args.keep_files:
            logger.info("input and outputs kept in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    agreed = bool(report["agreement"] and report["agreement"]["ok"])
    rates = {k: row["rows_per_s"] for k, row in report["results"].items()}
    report["ratios"] = compute_ratios(rates, agreed)
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["duration_s"] = time.time() - started_unix
    paths = write_json(report, args.output)
    print(render(report))
    logger.info("results written to %s", ", ".join(str(p) for p in paths))
    if report["agreement"] is not None and not agreed:
        logger.error("the Ray Data job and the plain loop wrote different predictions")
    return 1 if failures or not agreed else 0


if __name__ == "__main__":
    raise SystemExit(main())
