"""Environment settings: where things are and secrets (DESIGN contract 6, second layer).

Every field reads ``INTENT_SERVING_<FIELD>`` from the environment. ``MLFLOW_TRACKING_URI`` is
honoured too, because that is the variable every MLflow user already knows. Read settings through
:func:`get_settings`; tests call ``get_settings.cache_clear()`` after changing the environment.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from servecore.api.auth import ApiKey


def project_root() -> Path:
    """The checkout holding the shipped data and configs, else the working directory."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    return Path.cwd()


class Settings(BaseSettings):
    """Where the registry and caches live; read once per process."""

    model_config = SettingsConfigDict(env_prefix="INTENT_SERVING_", extra="ignore")

    home: Path = Field(default_factory=project_root)
    """Folder holding the embedded registry (``mlflow.db``, ``mlartifacts/``) and caches."""

    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("INTENT_SERVING_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
    )
    """MLflow tracking/registry URI; unset means the embedded sqlite store under ``home``."""

    registry_retries: int = Field(default=3, ge=0, le=10)
    """Retries of a failed MLflow HTTP call (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` wins when set).
    MLflow's own default (7, doubling from 2 s) keeps a start-up against a dead server waiting for
    minutes; with 3 a replica reports the unreachable registry within about ten seconds."""

    registry_timeout_s: int = Field(default=30, ge=1, le=600)
    """Timeout of one MLflow HTTP call (``MLFLOW_HTTP_REQUEST_TIMEOUT`` wins when set)."""

    experiment_name: str = "intent-serving"
    """MLflow experiment that the bootstrap logs its training runs to."""

    model_cache_dir: Path | None = None
    """Where remote artifacts are downloaded, once per version; default ``home/.cache/models``."""

    jobs_dir: Path | None = None
    """Folder of the embedded job store and broker, and of dataset job outputs; default
    ``home/.jobs``."""

    jobs_store_url: str | None = None
    """SQLAlchemy URL of the job store; unset means ``jobs.db`` in the jobs folder (one machine).
    Runners on several nodes need a shared database (``postgresql://...``)."""

    jobs_broker_url: str | None = None
    """Celery broker of the job queue; unset means the filesystem broker in the jobs folder
    (no server, one machine). Production: ``redis://host:6379/0``."""

    jobs_queue: str = "intent-jobs"
    """Queue name on the broker."""

    rollout_sync_s: float = Field(default=1.0, ge=0.0, le=60.0)
    """How often each gateway replica syncs with the rollout store (the job store's database):
    sends its evidence and recorded answers, reads the rollout's step, and (one replica, by
    lease) judges the gates. It bounds how soon a failing candidate loses its traffic (about two
    intervals). 0 turns rollouts off in this deployment."""

    streams_url: str | None = None
    """Redis holding the streams the ``StreamConsumer`` reads and writes
    (``redis://host:6379/0``). Unset: the application has no stream consumer at all. Turn
    persistence on there (``appendonly yes``): an acknowledged message lives only in Redis."""

    jobs_data_dir: Path | None = None
    """Dataset jobs may only read under this folder; default ``home/data``."""

    jobs_output_dir: Path | None = None
    """Where dataset jobs write their output, one folder per job; default ``outputs`` in the jobs
    folder."""

    webhook_secret: SecretStr | None = None
    """HMAC-SHA256 key that signs job callbacks; jobs with a ``callback_url`` are refused while
    it is unset."""

    webhook_allow: str = ""
    """Comma-separated networks that callbacks may reach although they are private or loopback
    (e.g. ``10.1.0.0/16``); empty allows public addresses only."""

    api_keys: list[ApiKey] = Field(default_factory=list)
    """The API keys, hashed: a JSON list of ``{"name", "hash", "scopes", ["rate_per_s", "burst"]}``
    (``python -m servecore.api.auth new NAME`` makes one). Empty: every route is open (local
    use)."""

    prediction_log_dir: Path | None = None
    """Where the monitor writes the prediction log (rotated JSON lines); default
    ``home/.predictions``."""

    prediction_log_key: SecretStr | None = None
    """Key of the prediction log's text hash (HMAC-SHA256); unset means plain SHA-256, which
    anyone can check a guessed text against."""

    @property
    def prediction_log_folder(self) -> Path:
        return (self.prediction_log_dir or self.home / ".predictions").resolve()

    @property
    def webhook_networks(self) -> list[str]:
        return [part.strip() for part in self.webhook_allow.split(",") if part.strip()]

    @property
    def jobs_home(self) -> Path:
        return self.jobs_dir or self.home / ".jobs"

    @property
    def job_store(self) -> str:
        return self.jobs_store_url or f"sqlite:///{(self.jobs_home / 'jobs.db').resolve()}"

    @property
    def job_broker(self) -> str:
        return self.jobs_broker_url or "filesystem://"

    @property
    def job_data_dir(self) -> Path:
        return (self.jobs_data_dir or self.home / "data").resolve()

    @property
    def job_output_dir(self) -> Path:
        return (self.jobs_output_dir or self.jobs_home / "outputs").resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str | None:
        """Artifacts of new experiments: beside a sqlite store's file, else the server decides."""
        uri = self.tracking_uri
        if uri.startswith("sqlite:///"):
            return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return None

    @property
    def cache_dir(self) -> Path:
        return self.model_cache_dir or (self.home / ".cache" / "models")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
