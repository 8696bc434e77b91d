"""The real OIP clients (tritonclient), run in their own environment by the tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = Path(
    os.environ.get("INTENT_TEST_CLIENTS_PYTHON", ROOT / ".venv-clients/bin/python")
)


def run_triton_check(
    http: str, grpc_target: str, app: str, texts: list[str], key: str | None = None
) -> dict[str, Any]:
    """What ``tests/clients/triton_check.py`` saw, run by the clients' interpreter."""
    arguments = ["--http", http, "--grpc", grpc_target, "--app", app]
    arguments += [f"--text={t}" for t in texts]
    if key is not None:
        arguments += ["--key", key]
    return _run_client("triton_check.py", arguments)


def run_model_check(
    http: str, grpc_target: str, app: str, model: str, rows: Path, version: str | None = None
) -> dict[str, Any]:
    """What ``tests/clients/model_check.py`` saw for a generic model application."""
    arguments = ["--http", http, "--grpc", grpc_target, "--app", app, "--model", model]
    arguments += ["--rows", str(rows)]
    if version is not None:
        arguments += ["--version", version]
    return _run_client("model_check.py", arguments)


def _run_client(script: str, arguments: list[str]) -> dict[str, Any]:
    """Run ``tests/clients/<script>`` with the clients' interpreter; its JSON report."""
    assert CLIENTS_PYTHON.exists(), (
        f"{CLIENTS_PYTHON} is missing: `make test` creates the clients' environment "
        "(tests/clients/requirements.txt)"
    )
    command = [str(CLIENTS_PYTHON), str(ROOT / "tests/clients" / script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report
