"""The package layout holds: the serving core imports none of its users.

``servecore`` is the plain core (protocol fronts, traffic core, pipeline spec, registry, jobs,
monitoring). The model classes and Serve wrappers (``deployments``), the application builders
(``graphs``), the Ray Data pipelines (``batch``) and training (``training``) build on it, never the
other way round. The check reads every import statement, those inside functions included, so a
lazy import cannot slip past it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USERS = ("deployments", "graphs", "batch", "training", "bench", "tests")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_core_imports_none_of_its_users() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "servecore").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in USERS
    ]
    assert offending == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from deployments.encoder import Encoder\n    return Encoder\n")
    assert imported_modules(module) == [(2, "deployments.encoder")]


@pytest.mark.parametrize(
    "package", ["api", "traffic", "pipeline", "registry", "jobs", "monitoring"]
)
def test_every_sub_package_says_what_it_holds(package: str) -> None:
    init = ROOT / "servecore" / package / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text()))


def test_pyfunc_wrappers_pickled_under_the_old_module_are_repointed(tmp_path: Path, monkeypatch):
    """Versions registered before ``servecore.mlflow_models`` moved to ``training.mlflow_models``
    stay loadable: their pickles are rewritten to name the new module (and nothing else)."""
    import pickle
    import sys
    import types

    from training import mlflow_models
    from training.migrate import repoint_file

    old = types.ModuleType("servecore.mlflow_models")
    legacy = type("HeadModel", (mlflow_models.HeadModel,), {"__module__": old.__name__})
    old.HeadModel = legacy
    monkeypatch.setitem(sys.modules, old.__name__, old)
    path = tmp_path / "python_model.pkl"
    path.write_bytes(pickle.dumps(legacy()))
    monkeypatch.delitem(sys.modules, old.__name__)

    assert repoint_file(path) is True
    assert type(pickle.loads(path.read_bytes())) is mlflow_models.HeadModel
    assert repoint_file(path) is False  # already repointed: left alone
