"""Two single-process FastAPI servers over the same model classes: the peers Serve is compared to.

Both load the ``intent`` application's models from the same registry URIs as the Serve graph
(``spec.stage_plans()`` of the same config file) and answer ``POST /v1/predict`` with the gateway's
request and response bodies:

* ``unbatched``: a sync endpoint, so each request runs the whole pipeline for its own texts in
  FastAPI's thread pool;
* ``microbatch``: one asyncio queue; a collector takes up to :data:`MAX_BATCH_TEXTS` pending texts
  (waiting at most :data:`MAX_WAIT_S` after the first), runs the pipeline once for all of them in a
  worker thread, and resolves each request's future with its rows.

Run one with uvicorn's factory mode; the mode and config come from the environment::

    BENCH_PEER_MODE=microbatch uvicorn --factory bench.peers:create_app_from_env --port 8100

:func:`peer_server` runs one that way as a subprocess for the benchmark and stops it by PID.
Importing this module loads nothing; the models load when the factory is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from bench.loadgen import LOOPBACK, free_port
from bench.pipeline import InProcessPipeline, load_spec
from graphs.deploy import wait_ready
from servecore import LABELS
from servecore.api.http_errors import install_error_handlers
from servecore.api.schemas import (
    Health,
    ModelVersion,
    Prediction,
    PredictRequest,
    PredictResponse,
)
from servecore.pipeline.batching import Batch, split_batch

logger = logging.getLogger(__name__)

MODES = ("unbatched", "microbatch")
MODE_ENV = "BENCH_PEER_MODE"
CONFIG_ENV = "BENCH_PEER_CONFIG"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "serve_config.yaml"
MAX_BATCH_TEXTS = 32
MAX_WAIT_S = 0.005


def request_id(request: Request) -> str:
    """The caller's ``X-Request-ID``, else a fresh one (the gateway does the same through Serve)."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def to_response(batch: Batch, models: list[ModelVersion], rid: str) -> PredictResponse:
    """The gateway's response body for the ensemble's output rows."""
    predictions = [
        Prediction(label=str(label), probabilities=dict(zip(LABELS, map(float, row), strict=True)))
        for label, row in zip(batch["label"], batch["probs"], strict=True)
    ]
    return PredictResponse(request_id=rid, predictions=predictions, models=models)


class MicroBatcher:
    """Gathers concurrent requests into one pipeline call; one batch runs at a time.

    While a batch runs in its worker thread, new requests queue; the next batch starts with
    whatever is queued (up to ``max_texts``) without waiting. A request's texts are never split
    across batches, so a batch may exceed ``max_texts`` by at most one request's texts.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[str]], Batch],
        max_texts: int = MAX_BATCH_TEXTS,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        self._run_batch = run_batch
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[list[str], asyncio.Future[Batch]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.texts = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, texts: list[str]) -> Batch:
        if self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        future: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        await self._queue.put((texts, future))
        return await future

    async def _gather(self) -> list[tuple[list[str], asyncio.Future[Batch]]]:
        loop = asyncio.get_running_loop()
        pending = [await self._queue.get()]
        count = len(pending[0][0])
        deadline = loop.time() + self.max_wait_s
        while count < self.max_texts:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    item = self._queue.get_nowait()
                else:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
            except (TimeoutError, asyncio.QueueEmpty):
                break
            pending.append(item)
            count += len(item[0])
        return pending

    async def _collect_forever(self) -> None:
        while True:
            pending = await self._gather()
            # A caller that went away (client disconnect) needs no rows.
            live = [(texts, fut) for texts, fut in pending if not fut.done()]
            if not live:
                continue
            sizes = [len(texts) for texts, _ in live]
            flat = [t for texts, _ in live for t in texts]
            try:
                output = await asyncio.to_thread(self._run_batch, flat)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                logger.exception("micro-batch of %d texts failed", len(flat))
                for _, future in live:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.texts += len(flat)
            for (_, future), part in zip(live, split_batch(output, sizes), strict=True):
                if not future.done():
                    future.set_result(part)


def create_app(mode: str, config_path: str | Path = DEFAULT_CONFIG) -> FastAPI:
    """A peer server in ``mode`` (``unbatched`` or ``microbatch``) over ``config_path``'s models."""
    if mode not in MODES:
        raise ValueError(f"peer mode must be one of {MODES}, got {mode!r}")
    pipeline = InProcessPipeline(load_spec(config_path))
    models = [ModelVersion(**m) for m in pipeline.models()]
    batcher = MicroBatcher(pipeline) if mode == "microbatch" else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if batcher is not None:
            batcher.start()
        try:
            yield
        finally:
            if batcher is not None:
                await batcher.stop()

    app = FastAPI(title=f"Intent peer ({mode})", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/stats")
    async def stats() -> dict[str, int | str]:
        """Batches and texts run so far (micro-batching mode), to show how well batches fill."""
        if batcher is None:
            return {"mode": mode}
        return {"mode": mode, "batches": batcher.batches, "texts": batcher.texts}

    if batcher is None:

        @app.post("/v1/predict", response_model=PredictResponse)
        def predict_unbatched(body: PredictRequest, request: Request) -> PredictResponse:
            """The whole pipeline for this request's texts, in FastAPI's thread pool."""
            return to_response(pipeline(body.texts), models, request_id(request))

    else:

        @app.post("/v1/predict", response_model=PredictResponse)
        async def predict_microbatch(body: PredictRequest, request: Request) -> PredictResponse:
            """This request's texts, classified in one batch with whatever else is pending."""
            rows = await batcher.submit(list(body.texts))
            return to_response(rows, models, request_id(request))

    return app


def create_app_from_env() -> FastAPI:
    """uvicorn ``--factory`` entry: mode from ``BENCH_PEER_MODE``, config from
    ``BENCH_PEER_CONFIG`` (default: the checkout's ``serve_config.yaml``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    mode = os.environ.get(MODE_ENV, "")
    config = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return create_app(mode, config)


@contextlib.contextmanager
def peer_server(
    mode: str, config_path: str | Path, log_dir: Path, start_timeout_s: float = 180.0
) -> Iterator[str]:
    """Run a peer as a ``uvicorn`` subprocess on a free loopback port; yields its base URL.

    The process is stopped by its PID on exit (SIGTERM, then SIGKILL after a grace period), also
    when starting or measuring failed. Its output goes to ``log_dir/peer-<mode>.log``.
    """
    if mode not in MODES:
        raise ValueError(f"peer mode must be one of {MODES}, got {mode!r}")
    port = free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    log_path = log_dir / f"peer-{mode}.log"
    env = {**os.environ, MODE_ENV: mode, CONFIG_ENV: str(Path(config_path).resolve())}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench.peers:create_app_from_env",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    logger.info("started %s peer, pid %d, on %s (log %s)", mode, process.pid, base_url, log_path)
    try:
        wait_ready(
            base_url,
            start_timeout_s,
            path="/healthz",
            still_alive=lambda: _raise_if_exited(process, log_path),
        )
        yield base_url
    finally:
        _stop(process, mode)


def _raise_if_exited(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        raise RuntimeError(
            f"peer exited with status {process.returncode} before it was ready; "
            f"log tail:\n{_tail(log_path)}"
        )


def _stop(process: subprocess.Popen[bytes], mode: str) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            logger.warning("%s peer (pid %d) ignored SIGTERM; killing it", mode, process.pid)
            process.kill()
            process.wait(timeout=20)
    logger.info("%s peer (pid %d) stopped, status %s", mode, process.pid, process.returncode)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(cannot read {path}: {e})"


def fetch_stats(base_url: str) -> dict[str, object]:
    """The peer's ``/stats`` (micro-batch sizes), or the error that prevented reading them."""
    try:
        response = httpx.get(f"{base_url}/stats", timeout=10, trust_env=False)
        response.raise_for_status()
        return dict(response.json())
    except (httpx.HTTPError, ValueError) as e:
        return {"error": repr(e)}
