"""The MLflow model registry as every stage sees it: ``models:/name@alias`` → a local model folder.

MLflow is imported lazily (it costs ~1.5 s and ~200 MB), so importing this module is cheap; so are
the settings (pydantic), so that a stage class given a folder runs where only torch is installed
(the GPU benchmark, :mod:`bench.gpu`).
Artifacts that already live on a local filesystem are read in place; remote ones are downloaded once
per version into the settings' cache folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import yaml

from servecore.errors import ModelNotFound, RegistryError, RegistryUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """Which registered model version a stage is running, and how it was asked for."""

    name: str
    version: str
    uri: str
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def local(cls, path: str | os.PathLike[str]) -> ModelRef:
        """A reference for a model handed in as a folder (unit tests, local experiments)."""
        path = Path(path)
        return cls(name=path.name, version="local", uri=path.resolve().as_uri())


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/name@alias`` or ``models:/name/3`` into (name, alias, version)."""
    match = _MODEL_URI.match(uri)
    if match is None:
        raise RegistryError(
            f"unsupported model URI {uri!r}: expected 'models:/<name>@<alias>' or "
            "'models:/<name>/<version>'"
        )
    return match["name"], match["alias"], match["version"]


_USERINFO = re.compile(r"//[^/@\s]+@")
"""The ``user:token@`` of any URL in a text."""

_REFUSALS = frozenset(
    {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}
)
"""MLflow error codes that mean the store answered and said no (an unknown model, version or
alias); any other failure means the store could not answer."""


def registry_failure(error: Exception, what: str, refused: str | None = None) -> RegistryError:
    """An exception from an MLflow call, as ours: a refusal stays a :class:`RegistryError`
    (the caller asked for something that is not there); anything else — a refused connection,
    a timeout, a server error, a broken database — is :class:`RegistryUnavailable`, naming the
    store so that an operator knows where to look. ``refused`` words a refusal (else ``what``)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, RegistryError):
        return error
    if isinstance(error, MlflowException) and error.error_code in _REFUSALS:
        return RegistryError(f"{refused or what}: {error.message}")
    detail = error.message if isinstance(error, MlflowException) else repr(error)
    from servecore.settings import get_settings

    store = get_settings().tracking_uri
    message = f"{what}: the model registry at {store} is unreachable or failing ({detail})"
    # Credentials stay out: the store's URI may carry them, and so does the client's own
    # message, which repeats the URL it called.
    return RegistryUnavailable(_USERINFO.sub("//", message))


def configure_mlflow() -> str:
    """Point this process's MLflow client at the configured store and return its URI.

    Also bounds MLflow's HTTP retries and timeout (settings ``registry_retries`` and
    ``registry_timeout_s``) unless the MLflow variables are set explicitly.
    """
    import mlflow

    from servecore.settings import get_settings

    settings = get_settings()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.registry_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.registry_timeout_s))
    uri = settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def get_client() -> MlflowClient:
    from mlflow import MlflowClient

    uri = configure_mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient) -> str:
    """The id of the settings' experiment, created (with the settings' artifact root) when the
    store has none yet: where the bootstrap logs its runs."""
    from servecore.settings import get_settings

    settings = get_settings()
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(
        client.create_experiment(settings.experiment_name, artifact_location=settings.artifact_root)
    )


def has_alias(client: MlflowClient, name: str, alias: str) -> bool:
    """Whether ``name@alias`` exists; a store that does not answer raises
    :class:`~servecore.errors.RegistryUnavailable` (an unanswered question is not a "no")."""
    try:
        client.get_model_version_by_alias(name, alias)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        failure = registry_failure(e, f"cannot read {name}@{alias}")
        if isinstance(failure, RegistryUnavailable):
            raise failure from e
        return False
    return True


def resolve(uri: str, client: MlflowClient | None = None) -> ModelRef:
    """Resolve an alias or version URI to the registered version it names right now."""
    name, alias, version = parse_model_uri(uri)
    client = client or get_client()
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, f"cannot resolve {uri!r}") from e
    return ModelRef(name=name, version=str(mv.version), uri=uri, aliases=tuple(mv.aliases or ()))


def pinned_version_uri(uri: str, version: str) -> str:
    """``models:/name/<version>`` of the model ``uri`` names, once the registry confirms it
    holds that version; one it does not hold is :class:`~servecore.errors.ModelNotFound`."""

    name = parse_model_uri(uri)[0]
    if not version.isdigit():
        raise ModelNotFound(f"model {name!r} has no version {version!r}: versions are numbers")
    try:
        ref = resolve(f"models:/{name}/{version}")
    except RegistryUnavailable:
        raise
    except RegistryError as e:
        raise ModelNotFound(f"model {name!r} has no version {version!r}") from e
    return f"models:/{ref.name}/{ref.version}"


def _local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(location)
    else:
        return None
    return path if path.is_dir() else None


def fetch(uri: str, client: MlflowClient | None = None) -> tuple[ModelRef, Path]:
    """Resolve ``uri`` and return the local folder of that MLflow model (with its MLmodel file)."""
    import mlflow

    from servecore.settings import get_settings

    client = client or get_client()
    ref = resolve(uri, client)
    try:
        location = client.get_model_version_download_uri(ref.name, ref.version)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, f"cannot locate {uri!r}") from e
    if (path := _local_path(location)) is not None:
        return ref, path

    target = get_settings().cache_dir / ref.name / ref.version
    if (target / "MLmodel").is_file():
        return ref, target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{ref.name}/{ref.version}", dst_path=str(staging)
        )
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise registry_failure(e, f"cannot download {uri!r}") from e
    try:
        os.replace(staging, target)
    except OSError:
        # Another process finished the same download first; its copy is identical.
        shutil.rmtree(staging, ignore_errors=True)
    if not (target / "MLmodel").is_file():
        raise RegistryError(f"download of {uri!r} left no MLmodel in {target}")
    return ref, target


def pyfunc_artifact(model_dir: Path, key: str) -> Path:
    """Path of artifact ``key`` in a pyfunc model folder logged with ``artifacts={key: ...}``."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    try:
        relative = mlmodel["flavors"]["python_function"]["artifacts"][key]["path"]
    except (KeyError, TypeError) as e:
        raise RegistryError(f"model at {model_dir} has no artifact {key!r}") from e
    return model_dir / relative


def open_model(
    model_uri: str | None, model_dir: str | os.PathLike[str] | None, artifact: str
) -> tuple[ModelRef, Path]:
    """What every stage constructor does: a registry URI, or a folder handed in directly.

    ``model_dir`` may be the MLflow model folder (containing ``MLmodel``) or the artifact folder
    itself.
    """
    if (model_uri is None) == (model_dir is None):
        raise ValueError("give exactly one of model_uri or model_dir")
    if model_uri is not None:
        ref, folder = fetch(model_uri)
        return ref, pyfunc_artifact(folder, artifact)
    folder = Path(model_dir)  # type: ignore[arg-type]
    if (folder / "MLmodel").is_file():
        return ModelRef.local(folder), pyfunc_artifact(folder, artifact)
    return ModelRef.local(folder), folder
