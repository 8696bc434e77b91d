"""The job runner: a Ray Serve task consumer that runs queued jobs (``POST /v1/jobs``).

Built on Ray Serve's task processor (``ray.serve.task_consumer``, Celery underneath): the gateway
stores a job (:mod:`servecore.jobs.store`) and sends its id to the queue; a runner replica's Celery
worker thread takes the id and runs the job:

- **texts** go through the *same* pipeline graph as online requests: the runner calls the
  gateway's ``classify_texts`` handle method a chunk at a time, so A/B variants, the pinned
  release, the cache and the fallback apply exactly as they do to ``/v1/predict``;
- **datasets** run the batch path's Ray Data pipeline (:func:`batch.pipeline.run_job`) on the
  same ``serve_config.yaml`` application, writing parquet under the jobs output folder.

While a job runs, a lease thread renews the runner's claim and records progress; it notices a
cancel request or a lost claim. Each replica also runs two housekeeping threads: the *reaper*,
which sends again the jobs whose runner died (lapsed lease) or whose message was lost, and the
*deliverer*, which POSTs signed completion webhooks with exponential backoff. Both work from the
job store, so any replica can finish what another one started.

The broker comes from the settings: Celery's filesystem transport under ``home/.jobs`` by
default (no server, one machine), Redis in production. The class is decorated with
``task_consumer`` by :func:`job_runner_deployment`, because the broker is only known at build time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.task_consumer import task_handler

from servecore.jobs.queue import TASK_NAME, JobProducer, task_processor_config
from servecore.jobs.store import (
    JOB_STATES,
    Delivery,
    Job,
    JobStore,
    chunks,
    dataset_path,
    public_job,
)
from servecore.jobs.webhooks import WebhookPolicy, deliver, parse_networks, payload
from servecore.monitoring.telemetry import metric
from servecore.settings import Settings, get_settings

logger = logging.getLogger("ray.serve")

DEFAULT_CONFIG_FILE = "serve_config.yaml"


class JobRunnerUserConfig(BaseModel):
    """Live knobs of the runner (``user_config`` of the ``JobRunner`` deployment)."""

    model_config = ConfigDict(extra="forbid")

    chunk_size: int = Field(default=64, ge=1, le=1024)
    """Texts per call to the pipeline graph (the gateway's micro-batch size is a good value)."""
    lease_s: float = Field(default=30.0, ge=2.0, le=3600.0)
    """How long a claim lasts without renewal; a dead runner's job is sent again after it."""
    requeue_after_s: float = Field(default=120.0, ge=1.0, le=86400.0)
    """A queued job that no runner picked up for this long is sent again (a lost message)."""
    reap_interval_s: float = Field(default=5.0, ge=0.2, le=600.0)
    dataset_wait_s: float = Field(default=600.0, ge=0.0, le=86400.0)
    """How long a dataset job waits for free CPUs (serving replicas may hold them all) before it
    fails."""
    call_retries: int = Field(default=3, ge=0, le=20)
    """Retries of one chunk when the pipeline is unavailable (backpressure, a replica restart)."""
    webhook_max_attempts: int = Field(default=6, ge=1, le=50)
    webhook_backoff_s: float = Field(default=2.0, ge=0.01, le=3600.0)
    """Wait before the second delivery attempt; doubled after each failure."""
    webhook_max_delay_s: float = Field(default=300.0, ge=0.01, le=86400.0)
    webhook_timeout_s: float = Field(default=10.0, gt=0.0, le=120.0)


class StopJob(Exception):
    """The job must stop: cancelled, or another runner took it over."""


class Lease:
    """Renews a job's claim in a thread while it runs; ``progress`` is read at each renewal."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, lease_s: float) -> None:
        self.store, self.job_id, self.attempt, self.lease_s = store, job_id, attempt, lease_s
        self.done = 0
        self.total: int | None = None
        self.progress: Any = None
        """Optional callable returning items done, polled at each renewal (dataset jobs)."""
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{job_id}")

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def renew(self) -> None:
        if self.progress is not None:
            try:
                self.done = int(self.progress())
            except Exception as e:  # noqa: BLE001 - progress is informative only
                logger.debug("progress of %s unreadable: %s", self.job_id, e)
        if not self.store.heartbeat(self.job_id, self.attempt, self.lease_s, self.done, self.total):
            self.lost = True

    def check(self) -> None:
        """Raise :class:`StopJob` once a renewal failed (cancel requested or claim lost)."""
        if self.lost:
            raise StopJob(self.job_id)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a store hiccup; the next renewal retries
                logger.warning("lease renewal of %s failed: %s", self.job_id, e)


def parquet_rows(folder: Path) -> int:
    """Rows in the parquet files written so far under ``folder`` (from their footers)."""
    import pyarrow.parquet as pq

    total = 0
    for path in folder.glob("*.parquet"):
        try:
            total += pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001, S112 - a file still being written
            continue
    return total


class JobRunner:
    """Runs jobs from the queue; see the module docstring."""

    def __init__(self, app_name: str | None = None, config_file: str | None = None) -> None:
        self.settings = get_settings()
        self.store = JobStore(self.settings.job_store)
        self.producer = JobProducer(self.settings)
        self.knobs = JobRunnerUserConfig()
        context = serve.get_replica_context()
        self.runner_id = context.replica_id.unique_id
        self.app_name = app_name or context.app_name
        self.config_file = Path(config_file or self.settings.home / DEFAULT_CONFIG_FILE)
        self._gateway: Any = None
        self._stop = threading.Event()
        self.jobs_run = 0
        self.deliveries_made = 0
        for target in (self._reap_forever, self._deliver_forever):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        logger.info("job runner %s on broker %s", self.runner_id, self.settings.job_broker)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.knobs = JobRunnerUserConfig.model_validate(config or {})

    def __del__(self) -> None:
        self._stop.set()

    @property
    def gateway(self) -> Any:
        if self._gateway is None:
            handle = serve.get_deployment_handle("Gateway", app_name=self.app_name)
            # Called from Celery's worker threads, which run no event loop: Ray's throughput
            # profile (graphs.deploy.SERVE_ENV) routes handle calls on the caller's loop unless
            # the handle asks for a router loop of its own (an init option Serve has no public
            # setter for yet).
            handle._init(_run_router_in_separate_loop=True)
            self._gateway = handle
        return self._gateway

    # --- running a job -------------------------------------------------------------------------

    @task_handler(name=TASK_NAME)
    def run_job(self, job_id: str) -> str:
        """The Celery task: claim, run, record. Never raises (Celery must not retry it)."""
        knobs = self.knobs
        attempt = self.store.claim(job_id, self.runner_id, knobs.lease_s)
        if attempt is None:
            logger.info("job %s: not claimable (taken, finished or cancelled)", job_id)
            return "skipped"
        job = self.store.get(job_id)
        logger.info("job %s (%s) attempt %d on %s", job_id, job.kind, attempt, self.runner_id)
        try:
            with Lease(self.store, job_id, attempt, knobs.lease_s) as lease:
                if job.kind == "texts":
                    result = self._run_texts(job, lease)
                else:
                    result = self._run_dataset(job, attempt, lease)
                lease.check()
                self.store.finish(job_id, attempt, "succeeded", result=result, done=lease.done)
        except StopJob:
            current = self.store.get(job_id)
            if current.cancel_requested:
                self.store.finish(job_id, attempt, "cancelled", done=lease.done)
            logger.info("job %s stopped (%s)", job_id, current.state)
            return "stopped"
        except Exception as e:  # noqa: BLE001 - the failure is the job's outcome
            logger.exception("job %s failed", job_id)
            self.store.finish(
                job_id, attempt, "failed", error={"type": "job_failed", "message": _reason(e)}
            )
            return "failed"
        finally:
            self.jobs_run += 1
        return "done"

    def _run_texts(self, job: Job, lease: Lease) -> dict[str, Any]:
        texts: list[str] = job.request["texts"]
        user_key = job.request.get("user_key")
        lease.total = len(texts)
        predictions: list[dict[str, Any]] = []
        releases: list[dict[str, Any]] = []
        degraded = 0
        for chunk in chunks(texts, self.knobs.chunk_size):
            lease.check()
            answer = self._classify(list(chunk), user_key, f"job-{job.id}")
            start = len(predictions)
            predictions.extend(answer["predictions"])
            degraded += len(chunk) if answer["degraded"] else 0
            if releases and releases[-1]["models"] == answer["models"]:
                releases[-1]["end"] = len(predictions)
            else:  # first chunk, or the release changed mid-job (an alias moved)
                releases.append(
                    {"start": start, "end": len(predictions), "models": answer["models"]}
                )
            lease.done = len(predictions)
        return {
            "predictions": predictions,
            "models": releases[0]["models"] if releases else [],
            "releases": releases,
            "variant": answer["variant"] if predictions else None,
            "degraded_texts": degraded,
        }

    def _classify(self, texts: list[str], user_key: str | None, trace: str) -> dict[str, Any]:
        delay = 0.5
        for attempt in range(self.knobs.call_retries + 1):
            try:
                answer: dict[str, Any] = self.gateway.classify_texts.remote(
                    texts, user_key, trace
                ).result(timeout_s=300)
                return answer
            except Exception as e:  # noqa: BLE001 - retried, then the job fails with it
                if attempt == self.knobs.call_retries:
                    raise
                logger.warning("pipeline call failed (%s); retrying in %.1fs", _reason(e), delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def _run_dataset(self, job: Job, attempt: int, lease: Lease) -> dict[str, Any]:
        from batch.inputs import detect_format, expand_input
        from batch.pipeline import JobOptions, estimate_rows, run_job
        from batch.plan import ClusterFull

        dataset = job.request["dataset"]
        path = dataset_path(self.settings, dataset["path"])
        paths = expand_input(str(path))
        lease.total = estimate_rows(paths, detect_format(paths)) or 0
        # One folder per attempt: a job taken over after a crash never mixes two runs' files.
        output = self.settings.job_output_dir / job.id / f"attempt-{attempt}"
        lease.progress = lambda: (
            parquet_rows(output / "predictions") + parquet_rows(output / "rejects")
        )
        options = JobOptions(
            input=str(path),
            config=self.config_file,
            app=self.app_name,
            output=str(output),
            text_column=dataset.get("text_column", "text"),
            id_column=dataset.get("id_column", "id"),
            progress=False,
        )
        deadline = time.monotonic() + self.knobs.dataset_wait_s
        while True:
            lease.check()
            try:
                summary = run_job(options)
                break
            except ClusterFull as e:  # raised before anything is read or written
                if time.monotonic() >= deadline:
                    raise
                logger.info("job %s waits for free CPUs: %s", job.id, e)
                time.sleep(5.0)
        lease.done = summary["rows_in"]
        keys = (
            "rows_in",
            "rows_scored",
            "rows_rejected",
            "rejected_by_reason",
            "rows_per_second",
            "elapsed_s",
            "model_versions",
            "predictions",
            "rejects",
            "summary",
        )
        return {key: summary[key] for key in keys}

    # --- housekeeping --------------------------------------------------------------------------

    def _reap_forever(self) -> None:
        while not self._stop.wait(self.knobs.reap_interval_s):
            try:
                self.reap()
                self._export_counts()
            except Exception as e:  # noqa: BLE001 - the store or broker is down; next round
                logger.warning("reaper: %s", e)

    def _export_counts(self) -> None:
        """The ``intent_jobs`` gauge: every state, zeros included, so a state that empties
        drops to 0 instead of keeping its last value."""
        counts = self.store.counts()
        gauge = metric("intent_jobs")
        for state in JOB_STATES:
            gauge.set(counts.get(state, 0), tags={"state": state})

    def reap(self) -> list[str]:
        """Finish abandoned cancellations and send stalled jobs again; returns the ids sent."""
        for job_id in self.store.abandon_cancelled():
            logger.info("reaper: job %s cancelled (its runner died)", job_id)
        sent = []
        for job_id in self.store.stalled(self.knobs.requeue_after_s):
            self.producer.send(job_id)
            self.store.mark_enqueued(job_id)
            sent.append(job_id)
            logger.warning("reaper: job %s sent again (runner died or message lost)", job_id)
        return sent

    def webhook_policy(self) -> WebhookPolicy | None:
        secret = self.settings.webhook_secret
        if secret is None:
            return None
        k = self.knobs
        return WebhookPolicy(
            secret=secret.get_secret_value(),
            allow=tuple(parse_networks(self.settings.webhook_networks)),
            max_attempts=k.webhook_max_attempts,
            backoff_s=k.webhook_backoff_s,
            max_delay_s=k.webhook_max_delay_s,
            timeout_s=k.webhook_timeout_s,
        )

    def _deliver_forever(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.deliver_one()
            except Exception as e:  # noqa: BLE001 - the store is down; next round
                logger.warning("webhook deliverer: %s", e)
                busy = False
            if not busy:
                self._stop.wait(0.5)

    def deliver_one(self) -> bool:
        """Deliver one due webhook; False when none was due."""
        policy = self.webhook_policy()
        timeout = policy.timeout_s if policy else self.knobs.webhook_timeout_s
        job = self.store.claim_delivery(lease_s=timeout + 30)
        if job is None:
            return False
        attempts = len(job.deliveries) + 1
        if policy is None:
            delivery = Delivery(attempt=attempts, at=time.time(), error="no webhook secret set")
            self.store.record_delivery(job.id, delivery, delivered=False, retry_at=None)
            return True
        assert job.callback_url is not None
        event = f"job.{job.state}"
        outcome = deliver(job.callback_url, payload(public_job(job)), event, policy)
        delivery = Delivery(
            attempt=attempts,
            at=time.time(),
            status_code=outcome.status_code,
            error=outcome.error,
            took_s=round(outcome.took_s, 4),
        )
        retry_at = None
        if not outcome.delivered and attempts < policy.max_attempts:
            retry_at = time.time() + policy.retry_delay(attempts)
        self.store.record_delivery(job.id, delivery, delivered=outcome.delivered, retry_at=retry_at)
        self.deliveries_made += 1
        logger.info("webhook of job %s attempt %d: %s", job.id, attempts, outcome)
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "runner": self.runner_id,
            "broker": self.settings.job_broker.split("://", 1)[0],
            "jobs_run": self.jobs_run,
            "deliveries_made": self.deliveries_made,
            "jobs": self.store.counts(),
            "knobs": self.knobs.model_dump(),
        }


def _reason(error: BaseException) -> str:
    """A short, caller-safe reason (no traceback, no internals beyond the error's own line)."""
    text = str(error).strip().splitlines()
    first = text[-1] if text else ""
    return f"{type(error).__name__}: {first}"[:300]


def job_runner_deployment(settings: Settings) -> Any:
    """The ``JobRunner`` Serve deployment, consuming from the settings' broker."""
    from ray.serve.task_consumer import task_consumer

    consumer = task_consumer(task_processor_config=task_processor_config(settings))(JobRunner)
    return serve.deployment(name="JobRunner", max_ongoing_requests=2)(consumer)
