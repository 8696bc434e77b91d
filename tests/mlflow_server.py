"""An MLflow tracking server over a given store, for tests that need one they can stop.

``mlflow server`` starts uvicorn and a job-executor fleet and takes tens of seconds on a busy
two-core machine; this runs MLflow's own REST handlers (the Flask app behind ``mlflow server``)
in one process with werkzeug, up in a few seconds. It prints ``ready`` once it listens.

    python -m tests.mlflow_server --store sqlite:///path/mlflow.db --port 5055
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mlflow_server")
    parser.add_argument("--store", required=True, help="backend (tracking + registry) store URI")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Read by mlflow.server when it is imported: without them it is not in server mode.
    os.environ["_MLFLOW_SERVER_FILE_STORE"] = args.store
    os.environ["_MLFLOW_SERVER_REGISTRY_STORE"] = args.store
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    from mlflow.server import app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", args.port, app, threaded=True)
    print("ready", flush=True)
    server.serve_forever()
    return 0


class MlflowServer:
    """Start and stop :func:`main` in a child process (by PID, never by name)."""

    def __init__(self, store: str, port: int) -> None:
        self.store = store
        self.port = port
        self.process: subprocess.Popen[str] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.mlflow_server"),
                *("--store", self.store, "--port", str(self.port)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the MLflow server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the MLflow server did not answer within {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


if __name__ == "__main__":
    sys.exit(main())
