"""Environment settings: where things are and secrets (DESIGN contract 6, second layer).

Every field reads ``INTENT_SERVING_<FIELD>`` from the environment. ``MLFLOW_TRACKING_URI`` is
honoured too, because that is the variable every MLflow user already knows. Read settings through
:func:`get_settings`; tests call ``get_settings.cache_clear()`` after changing the environment.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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

    experiment_name: str = "intent-serving"
    """MLflow experiment that the bootstrap logs its training runs to."""

    model_cache_dir: Path | None = None
    """Where remote artifacts are downloaded, once per version; default ``home/.cache/models``."""

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
