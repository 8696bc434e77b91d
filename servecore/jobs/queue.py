"""The job queue's sending side: Ray Serve's task-processor config for the configured broker, and
the producer that puts job ids on it (the jobs front sends, the runners' reaper re-sends)."""

from __future__ import annotations

import threading
from typing import Any

from servecore.settings import Settings

TASK_NAME = "intent.run_job"
"""The Celery task every job id is sent to (the runners' handler has this name)."""


def task_processor_config(settings: Settings) -> Any:
    """Ray Serve's task-processor config for the settings' broker (the same for the gateway,
    which sends, and the runners, which consume)."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    broker = settings.job_broker
    transport: dict[str, Any] | None = None
    if broker.startswith("filesystem"):
        folders = {
            name: settings.jobs_home / "broker" / name for name in ("queue", "processed", "control")
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
        }
        results = settings.jobs_home / "broker" / "results"
        results.mkdir(parents=True, exist_ok=True)
        backend = results.resolve().as_uri()
    else:
        backend = broker
    return TaskProcessorConfig(
        queue_name=settings.jobs_queue,
        adapter_config=CeleryAdapterConfig(
            broker_url=broker,
            backend_url=backend,
            broker_transport_options=transport,
            # One message at a time per worker thread: a busy replica does not hoard the queue,
            # so the queue depth tells the autoscaler the truth and an idle replica gets work.
            app_custom_config={"worker_prefetch_multiplier": 1, "result_expires": 3600},
        ),
        # The handler records failures on the job itself; Celery never retries it.
        max_retries=0,
    )


class JobProducer:
    """Sends job ids to the queue (used by the gateway and the reaper)."""

    def __init__(self, settings: Settings) -> None:
        self.config = task_processor_config(settings)
        self._adapter: Any = None
        self._lock = threading.Lock()

    def send(self, job_id: str) -> None:
        from ray.serve.task_consumer import instantiate_adapter_from_config

        with self._lock:
            if self._adapter is None:
                self._adapter = instantiate_adapter_from_config(self.config)
        self._adapter.enqueue_task_sync(TASK_NAME, args=[job_id])
