"""MLServer with adaptive batching as a benchmark peer: what many users would deploy instead.

The peer serves the ``intent`` application's model classes (the same spec, the same registered
versions, chained by :class:`servecore.pipeline.graph.StageChain`) from MLServer, answering the Open
Inference Protocol (V2) at ``POST /v2/models/intent/infer``; MLServer's adaptive batching
gathers concurrent requests with the micro-batching FastAPI peer's bounds
(:data:`bench.peers.MAX_BATCH_TEXTS` requests, :data:`bench.peers.MAX_WAIT_S` seconds).

MLServer 1.7.1 needs FastAPI < 0.116 and protobuf < 7, older than our own environment's, so it
runs from a virtual environment of its own, built on first use by :func:`ensure_env` under the
ignored ``.cache/bench/mlserver-venv``. That environment has no MLflow: every model URI is
resolved to a local folder here, in the benchmark's process, and the folders are handed to
:mod:`bench.mlserver_runtime` through ``model-settings.json``. When the environment cannot be
built (no network, a pip failure, an unsupported Python) :func:`ensure_env` returns the reason as
one line, and the benchmark skips the peer with it. Use::

    python = ensure_env()
    if isinstance(python, str):
        logger.warning("MLServer peer skipped: %s", python)
    else:
        with mlserver_server(config, log_dir, python) as base_url:
            spec = dataclasses.replace(plan.single_text(8), protocol=V2)
            measure(infer_url(base_url), spec, cycler, "mlserver c=8")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen import LOOPBACK, Protocol, free_port
from bench.peers import MAX_BATCH_TEXTS, MAX_WAIT_S
from servecore.pipeline.spec import PipelineSpec
from servecore.registry.client import ModelRef

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
VENV_DIR = ROOT / ".cache" / "bench" / "mlserver-venv"
"""Inside ``.cache/``, which ``.gitignore`` ignores."""
MARKER = "bench-requirements.json"
"""Written into the venv last, once the install was verified: its absence means a broken build."""
MLSERVER_PIN = "mlserver==1.7.1"
UVLOOP_PIN = "uvloop==0.21.0"
"""MLServer 1.7.1's inference workers call ``asyncio.get_event_loop()`` before any loop runs;
uvloop 0.22 and later refuse that (RuntimeError), so every worker dies at start and is restarted
for ever. 0.21.0 is the last release that hands out a loop there."""
SUPPORTED_PYTHON = ((3, 9), (3, 12))
"""MLServer 1.7.1 declares ``Requires-Python >=3.9,<3.13``."""
MODEL_NAME = "intent"
RUNTIME = "bench.mlserver_runtime.IntentRuntime"
TEXT_INPUT = "text"
LABEL_OUTPUT = "label"
PROBS_OUTPUT = "probabilities"
PARALLEL_WORKERS = 1
"""MLServer's own default, and our choice on two cores: the model runs in one worker process with
as many torch threads as CPUs (as the FastAPI peers' model does), while the main process keeps
HTTP parsing and the adaptive batcher on an event loop that the forward passes never block. Zero
workers would run the model inside that event loop and stall batching during every forward pass;
two workers would need two model copies at one torch thread each, a layout the FastAPI peers are
not given."""
PIP_TIMEOUT_S = 1200.0
VERIFY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0


# --- the Open Inference Protocol (V2) for the load generator -----------------------------------


def infer_url(base_url: str, model: str = MODEL_NAME) -> str:
    """The V2 inference endpoint of ``model`` on a server at ``base_url``."""
    return f"{base_url}/v2/models/{model}/infer"


def _v2_body(texts: list[str]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}
        ]
    }


def _v2_answers(body: Any) -> int:
    """Labels in a V2 response (``KeyError``/``TypeError`` when it has no ``label`` output)."""
    outputs = body["outputs"]
    if not isinstance(outputs, list):
        raise TypeError(f"outputs is {type(outputs).__name__}, not a list")
    for output in outputs:
        if output.get("name") == LABEL_OUTPUT:
            data = output["data"]
            if not isinstance(data, list):
                raise TypeError(f"label data is {type(data).__name__}, not a list")
            return len(data)
    raise KeyError(f"no {LABEL_OUTPUT!r} output among {[o.get('name') for o in outputs]}")


V2 = Protocol("MLServer V2 /v2/models/intent/infer", _v2_body, _v2_answers)
"""One BYTES input ``text`` of shape ``[n]``; answered by as many labels in the ``label`` output."""


# --- the virtual environment -------------------------------------------------------------------


def _our_version(package: str) -> str:
    """``package``'s version in this environment, without a local label (``2.13.0+cpu``)."""
    return metadata.version(package).split("+", 1)[0]


def requirements() -> list[str]:
    """What the MLServer environment installs, in order: torch first, so that its pin (the CPU
    build on this machine) is in place before anything that depends on torch is resolved. The
    model libraries are pinned to ours, so both environments compute with the same code."""
    return [
        f"torch=={_our_version('torch')}",
        MLSERVER_PIN,
        UVLOOP_PIN,
        f"transformers=={_our_version('transformers')}",
        f"safetensors=={_our_version('safetensors')}",
        f"numpy=={_our_version('numpy')}",
        f"pyyaml=={_our_version('pyyaml')}",
    ]


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / "bin" / "python"


def ensure_env(
    venv_dir: Path = VENV_DIR,
    base_python: str | os.PathLike[str] | None = None,
    reqs: Sequence[str] | None = None,
    pip_options: Sequence[str] = (),
    timeout_s: float = PIP_TIMEOUT_S,
) -> Path | str:
    """The MLServer environment's python, built on first use (and again when ``reqs`` change).

    Returns the path of its interpreter, or one line saying why it cannot be had (no network,
    a pip failure or timeout, a Python that MLServer does not support); it never raises for
    those. pip's output goes to ``<venv_dir>.log``. ``pip_options`` are added to every pip
    install (``--index-url ...``); ``base_python`` makes the venv (default: this interpreter).
    """
    venv_dir = Path(venv_dir)
    reqs = list(requirements() if reqs is None else reqs)
    log_path = venv_dir.with_name(venv_dir.name + ".log")
    try:
        venv_dir.parent.mkdir(parents=True, exist_ok=True)
        # Two benchmark runs starting at once must not both build into the same folder.
        with open(venv_dir.with_name(venv_dir.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _ensure_env_locked(
                venv_dir, base_python or sys.executable, reqs, pip_options, timeout_s, log_path
            )
    except OSError as e:
        return f"cannot build the MLServer environment in {venv_dir}: {e}"


def _ensure_env_locked(
    venv_dir: Path,
    base_python: str | os.PathLike[str],
    reqs: list[str],
    pip_options: Sequence[str],
    timeout_s: float,
    log_path: Path,
) -> Path | str:
    python = venv_python(venv_dir)
    wanted = {"requirements": reqs, "pip_options": list(pip_options)}
    if python.exists() and _read_marker(venv_dir) == wanted:
        return python

    version = _python_version(base_python)
    if isinstance(version, str):
        return version
    low, high = SUPPORTED_PYTHON
    if not low <= version <= high:
        return (
            f"MLServer 1.7.1 needs Python {low[0]}.{low[1]}-{high[0]}.{high[1]}; "
            f"{base_python} is {version[0]}.{version[1]}"
        )

    started = time.monotonic()
    logger.info("building the MLServer environment in %s (pip log: %s)", venv_dir, log_path)
    shutil.rmtree(venv_dir, ignore_errors=True)
    with open(log_path, "w") as log:
        steps: list[tuple[str, list[str], float]] = [
            ("create the venv", [str(base_python), "-m", "venv", str(venv_dir)], 300.0),
            # torch alone first: with its pin in place the second step cannot pull another build.
            (f"install {reqs[0]}", _pip(python, reqs[:1], pip_options), timeout_s),
            ("install the rest", _pip(python, reqs, pip_options), timeout_s),
            ("verify the imports", [str(python), "-c", _VERIFY], VERIFY_TIMEOUT_S),
        ]
        for what, command, limit in steps:
            failure = _run_step(what, command, limit, log, log_path)
            if failure is not None:
                return failure
    (venv_dir / MARKER).write_text(json.dumps(wanted, indent=1) + "\n")
    logger.info("MLServer environment ready in %.0fs", time.monotonic() - started)
    return python


_VERIFY = (
    "import mlserver, torch, transformers, safetensors, yaml, numpy; "
    "import bench.mlserver_runtime, deployments.tokenizer, deployments.encoder, "
    "deployments.heads, deployments.bag_of_words, deployments.ensemble; "
    "print('mlserver', mlserver.__version__, 'torch', torch.__version__)"
)
"""Run in the new venv, with the checkout on ``PYTHONPATH`` (see :func:`_run_step`): the runtime
and every stage class it builds must import there, or the peer would only fail at start-up."""


def _pip(python: Path, reqs: Sequence[str], options: Sequence[str]) -> list[str]:
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", *options, *reqs]


def _run_step(
    what: str, command: list[str], timeout_s: float, log: Any, log_path: Path
) -> str | None:
    """Run one build step, its output appended to ``log``; a one-line reason if it failed."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}
    try:
        # A group of its own: on a timeout pip's build subprocesses are stopped with it.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
    except OSError as e:
        return f"MLServer environment: cannot {what}: {e}"
    try:
        status = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return f"MLServer environment: {what} took over {timeout_s:.0f}s (log: {log_path})"
    if status != 0:
        log.flush()
        return (
            f"MLServer environment: {what} failed (status {status}): "
            f"{_last_line(log_path)} (log: {log_path})"
        )
    return None


def _python_version(python: str | os.PathLike[str]) -> tuple[int, int] | str:
    try:
        result = subprocess.run(
            [str(python), "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"MLServer environment: cannot run {python}: {e}"
    try:
        major, minor = (int(part) for part in result.stdout.split())
    except ValueError:
        return f"MLServer environment: {python} did not say its version: {result.stderr.strip()}"
    return major, minor


def _read_marker(venv_dir: Path) -> Any:
    try:
        return json.loads((venv_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    """The last error-looking line of a pip log (else its last line): the skip line's reason."""
    lines = [line.strip() for line in _tail(path, 4000).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR") or "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(cannot read {path}: {e})"


# --- the server --------------------------------------------------------------------------------


Fetch = Callable[[str], tuple[ModelRef, Path]]


def runtime_parameters(spec: PipelineSpec, fetch: Fetch | None = None) -> dict[str, Any]:
    """What :class:`bench.mlserver_runtime.IntentRuntime` is built from: the spec's stage plans
    with every ``model_uri`` replaced by the local folder of the version it names now, and those
    versions (reported in every response, as the gateway reports them)."""
    if fetch is None:
        from servecore.registry.client import fetch
    folders: dict[str, tuple[ModelRef, Path]] = {}
    stages: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for plan in spec.stage_plans():
        if plan.stage_class == "deployments.pyfunc_member:PyfuncMember":
            raise ValueError(
                f"stage {plan.deployment} is an MLflow pyfunc model; the MLServer peer's "
                "environment has no MLflow to load it"
            )
        kwargs = dict(plan.init_kwargs)
        uri = kwargs.pop("model_uri", None)
        if uri is not None:
            if uri not in folders:
                folders[uri] = fetch(uri)
            ref, folder = folders[uri]
            kwargs["model_dir"] = str(Path(folder).resolve())
            models.append({"stage": plan.deployment, **ref.to_dict()})
        stages.append(
            {
                "deployment": plan.deployment,
                "stage_class": plan.stage_class,
                "init_kwargs": kwargs,
                "input": plan.input,
                "output_prefix": plan.output_prefix,
                "members": list(plan.members),
                "outputs": list(plan.outputs),
            }
        )
    return {"stages": stages, "models": models}


def write_settings(
    folder: Path,
    parameters: dict[str, Any],
    http_port: int,
    grpc_port: int,
    parallel_workers: int = PARALLEL_WORKERS,
) -> tuple[Path, Path]:
    """Write MLServer's ``settings.json`` and the model's ``model-settings.json`` into
    ``folder`` (the folder ``mlserver start`` is given); returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": LOOPBACK,
        "http_port": http_port,
        "grpc_port": grpc_port,
        # No metrics server and no /metrics route: nothing else listens, and the peers do not
        # pay for Prometheus either. MLServer still keeps per-process files in metrics_dir.
        "metrics_endpoint": None,
        "metrics_dir": str(folder / "metrics"),
        "environments_dir": str(folder / "envs"),
        "parallel_workers": parallel_workers,
        "model_repository_root": str(folder),
        "load_models_at_startup": True,
        "debug": False,
    }
    model_settings = {
        "name": MODEL_NAME,
        "implementation": RUNTIME,
        # The micro-batching FastAPI peer's bounds. MLServer counts requests where that peer
        # counts texts; with one text per request (the benchmark's load) they are the same.
        "max_batch_size": MAX_BATCH_TEXTS,
        "max_batch_time": MAX_WAIT_S,
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBS_OUTPUT, "datatype": "FP32", "shape": [-1, -1]},
        ],
        "parameters": {"extra": parameters},
    }
    settings_path = folder / "settings.json"
    model_path = folder / MODEL_NAME / "model-settings.json"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=1) + "\n")
    model_path.write_text(json.dumps(model_settings, indent=1) + "\n")
    return settings_path, model_path


@contextlib.contextmanager
def mlserver_server(
    config_path: str | os.PathLike[str],
    log_dir: Path,
    python: str | os.PathLike[str],
    start_timeout_s: float = 300.0,
    parallel_workers: int = PARALLEL_WORKERS,
) -> Iterator[str]:
    """Run MLServer over ``config_path``'s ``intent`` models on free loopback ports; yields its
    base URL once the server and the model are ready.

    ``python`` is :func:`ensure_env`'s interpreter. The server runs in a process group of its own
    (MLServer forks its workers) and is stopped by that group's id on exit: SIGTERM, then SIGKILL
    after a grace period, also when starting or measuring failed. Its settings and its output
    (``mlserver.log``) are in ``log_dir/mlserver``.
    """
    from bench.pipeline import load_spec

    folder = Path(log_dir) / "mlserver"
    parameters = runtime_parameters(load_spec(config_path))
    http_port = free_port()
    grpc_port = free_port()
    while grpc_port == http_port:
        grpc_port = free_port()
    write_settings(folder, parameters, http_port, grpc_port, parallel_workers)
    base_url = f"http://{LOOPBACK}:{http_port}"
    log_path = folder / "mlserver.log"
    mlserver = Path(python).parent / "mlserver"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}
    # Our venv's variables must not leak into MLServer's interpreter.
    env.pop("VIRTUAL_ENV", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(mlserver), "start", str(folder)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    logger.info("started MLServer, pid %d, on %s (log %s)", process.pid, base_url, log_path)
    try:
        _wait_ready(base_url, process, log_path, start_timeout_s)
        yield base_url
    finally:
        _stop(process)


def _wait_ready(
    base_url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float
) -> None:
    """Until both the server and the model say ready; fails at once if the process exits."""
    from graphs.deploy import wait_ready

    def alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(
                f"MLServer exited with status {process.returncode} before it was ready; "
                f"log tail:\n{_tail(log_path)}"
            )

    deadline = time.monotonic() + timeout_s
    try:
        for path in ("/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
            wait_ready(base_url, max(0.5, deadline - time.monotonic()), path, still_alive=alive)
    except TimeoutError as e:
        raise TimeoutError(f"MLServer {e}; log tail:\n{_tail(log_path)}") from e


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after a grace period."""
    group = process.pid  # start_new_session: the group id is the server's own pid
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("MLServer (pid %d) ignored SIGTERM; killing its group", process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            process.wait(timeout=STOP_GRACE_S)
    # Workers that outlived the server (it exited first) are still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    logger.info("MLServer (pid %d) stopped, status %s", process.pid, process.returncode)
