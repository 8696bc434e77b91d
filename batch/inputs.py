"""Reading a batch job's input and sorting its rows into scorable texts and rejects.

Parquet, CSV and JSON lines are read by extension. JSON lines are parsed here, line by line, rather
than by Arrow's reader: one record whose text is a number would make Arrow fail the whole file, and
a bad row must never sink a job. Every row becomes either a valid row (``id``, ``text``) or a reject
(``id``, ``raw``, ``reason``); the same function does both, so the two outputs always add up.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from batch.plan import ID, TASK_CPUS, TEXT
from servecore.api.schemas import MAX_TEXT_CHARS

if TYPE_CHECKING:
    from ray.data import Dataset

Format = Literal["parquet", "csv", "jsonl"]
Keep = Literal["valid", "rejected"]

FORMATS: dict[str, Format] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}

NULL = "null"
EMPTY = "empty"
NOT_A_STRING = "not_a_string"
TOO_LONG = "too_long"
INVALID_JSON = "invalid_json"
REASONS = (NULL, EMPTY, NOT_A_STRING, TOO_LONG, INVALID_JSON)
"""Why a row was rejected: no text, blank text, a text that is not a string, more than
``MAX_TEXT_CHARS`` characters (the online API's limit), or a JSON line that does not parse to an
object."""


def rejection_reason(value: Any) -> str | None:
    """Why ``value`` cannot be scored, or None when it can (the online API's rules)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NULL
    if not isinstance(value, str):
        return NOT_A_STRING
    if not value.strip():
        return EMPTY
    if len(value) > MAX_TEXT_CHARS:
        return TOO_LONG
    return None


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_input(path_or_glob: str) -> list[str]:
    """Local files named by a path, a folder (its files) or a glob; remote URIs pass through."""
    if _is_remote(path_or_glob):
        return [path_or_glob]
    if os.path.isdir(path_or_glob):
        found = sorted(
            os.path.join(path_or_glob, name)
            for name in os.listdir(path_or_glob)
            if os.path.splitext(name)[1].lower() in FORMATS
        )
    else:
        found = sorted(p for p in glob.glob(path_or_glob) if os.path.isfile(p))
    if not found:
        raise FileNotFoundError(f"no input files match {path_or_glob!r}")
    return found


def detect_format(paths: Sequence[str]) -> Format:
    """The one format of ``paths``, by extension (``.gz`` etc. after it are allowed)."""
    formats = set()
    for path in paths:
        name = path.lower()
        for compression in (".gz", ".bz2", ".zst", ".lz4", ".br"):
            name = name.removesuffix(compression)
        ext = os.path.splitext(name)[1]
        if ext not in FORMATS:
            raise ValueError(
                f"cannot tell the format of {path!r}: use one of {sorted(FORMATS)} as extension"
            )
        formats.add(FORMATS[ext])
    if len(formats) != 1:
        raise ValueError(f"inputs mix formats {sorted(formats)}; give one format per job")
    return formats.pop()


def read_input(
    paths: Sequence[str], fmt: Format, text_column: str, num_blocks: int | None
) -> Dataset:
    """The raw input as a Dataset (JSON lines as one ``text`` column of lines)."""
    import ray.data
    from pyarrow import csv

    common: dict[str, Any] = {"override_num_blocks": num_blocks, "num_cpus": TASK_CPUS}
    if fmt == "parquet":
        return _read_parquet(paths, common)
    if fmt == "csv":
        return ray.data.read_csv(
            list(paths),
            # A text column of digits is still text; quoted fields may hold newlines.
            convert_options=csv.ConvertOptions(column_types={text_column: pa.string()}),
            parse_options=csv.ParseOptions(newlines_in_values=True),
            **common,
        )
    return ray.data.read_text(list(paths), drop_empty_lines=True, **common)


def read_table(paths: Sequence[str], fmt: Format, num_blocks: int | None = None) -> Dataset:
    """The input as typed columns (a generic model's rows): parquet, CSV or JSON lines, read by
    tasks that ask for :data:`TASK_CPUS` (see :func:`read_input` for the parquet reader)."""
    import ray.data

    common: dict[str, Any] = {"override_num_blocks": num_blocks, "num_cpus": TASK_CPUS}
    if fmt == "parquet":
        return _read_parquet(paths, common)
    if fmt == "csv":
        return ray.data.read_csv(list(paths), **common)
    return ray.data.read_json(list(paths), lines=True, file_extensions=None, **common)


def _read_parquet(paths: Sequence[str], common: dict[str, Any]) -> Dataset:
    """The V2 parquet reader lists files in a task that always asks for a whole CPU, which never
    starts on a small node whose other CPUs the stages (or Serve) hold. The V1 reader lists on
    the driver and honours ``num_cpus``."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(list(paths), file_extensions=None, **common)
    finally:
        context.use_datasource_v2 = previous


def _raw(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _id_array(values: list[Any]) -> pa.Array:
    """Ids from JSON as one Arrow type: as given when they agree, else as strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _sort(
    ids: pa.Array | list[Any],
    texts: list[Any],
    errors: list[str | None],
    keep: Keep,
) -> pa.Table:
    reasons = [err or rejection_reason(text) for text, err in zip(texts, errors, strict=True)]
    wanted = [i for i, r in enumerate(reasons) if (r is None) == (keep == "valid")]
    if isinstance(ids, pa.Array):
        kept_ids = ids.take(pa.array(wanted, type=pa.int64()))
    else:
        kept_ids = _id_array([ids[i] for i in wanted])
    if keep == "valid":
        kept_texts = pa.array([texts[i] for i in wanted], type=pa.string())
        return pa.table({ID: kept_ids, TEXT: kept_texts})
    raws = pa.array([_raw(texts[i]) for i in wanted], type=pa.string())
    why = pa.array([reasons[i] for i in wanted], type=pa.string())
    return pa.table({ID: kept_ids, "raw": raws, "reason": why})


def select_rows(table: pa.Table, text_column: str, id_column: str, keep: Keep) -> pa.Table:
    """Rows of a parquet or CSV batch that can be scored (``keep="valid"``: ``id``, ``text``) or
    cannot (``keep="rejected"``: ``id``, ``raw``, ``reason``)."""
    for column in (text_column, id_column):
        if column not in table.column_names:
            raise KeyError(
                f"input has no column {column!r} (it has {table.column_names}); "
                "choose columns with --text-column and --id-column"
            )
    texts = table.column(text_column).to_pylist()
    ids = table.column(id_column).combine_chunks()
    return _sort(ids, texts, [None] * len(texts), keep)


def select_json_rows(table: pa.Table, text_column: str, id_column: str, keep: Keep) -> pa.Table:
    """Like :func:`select_rows` for a batch of JSON lines (one ``text`` column of raw lines)."""
    ids: list[Any] = []
    texts: list[Any] = []
    errors: list[str | None] = []
    for line in table.column(TEXT).to_pylist():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            ids.append(record.get(id_column))
            texts.append(record.get(text_column))
            errors.append(None)
        else:
            ids.append(None)
            texts.append(line)
            errors.append(INVALID_JSON)
    return _sort(ids, texts, errors, keep)


def selected(
    dataset: Dataset, fmt: Format, text_column: str, id_column: str, keep: Keep
) -> Dataset:
    """``dataset`` (from :func:`read_input`) reduced to its valid rows or its rejects."""
    fn: Any = select_json_rows if fmt == "jsonl" else select_rows
    return dataset.map_batches(
        fn,
        fn_kwargs={"text_column": text_column, "id_column": id_column, "keep": keep},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=TASK_CPUS,
    )
