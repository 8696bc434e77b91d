"""Keep versions registered before the package layout changed loadable as MLflow pyfunc models.

The shipped models' pyfunc wrappers were pickled (by MLflow, with cloudpickle) as
``servecore.mlflow_models.<Class>``; they now live in :mod:`training.mlflow_models`, because the
serving core must not import the model classes they wrap. A version whose ``python_model.pkl``
still names the old module cannot be loaded with ``mlflow.pyfunc.load_model`` any more (serving
and batch are unaffected: they read the artifacts directly). :func:`repoint_pyfunc_wrappers`
rewrites those pickles in place, mapping the old module to the new one and nothing else; the
bootstrap calls it on every run, so ``make serve`` heals an existing embedded registry.

Only artifact stores on a local filesystem are rewritten here (the embedded default); versions in a
remote store are listed for the operator (download, run :func:`repoint_file`, upload).
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MOVED = {"servecore.mlflow_models": "training.mlflow_models"}
"""Old module → new module of the pickled pyfunc wrapper classes."""
PICKLE = "python_model.pkl"


class _Repointing(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MOVED.get(module, module), name)


def repoint_file(path: Path) -> bool:
    """Rewrite one ``python_model.pkl`` that names a moved module; True when it did."""
    raw = path.read_bytes()
    if not any(old.encode() in raw for old in MOVED):
        return False
    model = _Repointing(io.BytesIO(raw)).load()
    import cloudpickle

    staging = path.with_suffix(".pkl.new")
    staging.write_bytes(cloudpickle.dumps(model))
    staging.replace(path)
    return True


def repoint_pyfunc_wrappers(names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Every version of ``names`` whose wrapper pickle names a moved module: rewritten in place
    where the artifacts are local, else listed. Returns (rewritten, remote) as ``name/version``."""
    from servecore.registry.client import _local_path, get_client

    client = get_client()
    rewritten: list[str] = []
    remote: list[str] = []
    for name in names:
        for version in client.search_model_versions(f"name='{name}'"):
            label = f"{name}/{version.version}"
            location = client.get_model_version_download_uri(name, version.version)
            folder = _local_path(location)
            if folder is None:
                remote.append(label)
                continue
            pickled = folder / PICKLE
            if pickled.is_file() and repoint_file(pickled):
                rewritten.append(label)
    if rewritten:
        logger.info("pyfunc wrappers repointed to %s: %s", list(MOVED.values()), rewritten)
    return rewritten, remote
