"""The MLServer peer's parts that run without MLServer: the V2 protocol the load generator speaks,
the settings files it writes, the venv builder's refusals and the server process's lifecycle
(against stand-in servers). Building the real environment takes minutes and is left to the
benchmark; the runtime's own tests run only where MLServer is importable."""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import mlserver_peer as peer
from bench.loadgen import Protocol
from bench.peers import MAX_BATCH_TEXTS, MAX_WAIT_S
from servecore.registry.client import ModelRef
from tests.conftest import ROOT, STAGES

# --- the protocol ------------------------------------------------------------------------------


def test_v2_body_is_one_bytes_input_of_n_texts():
    assert isinstance(peer.V2, Protocol)
    body = peer.V2.body(["I was charged twice", "where is my parcel", "héllo"])
    assert body == {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [3],
                "data": ["I was charged twice", "where is my parcel", "héllo"],
            }
        ]
    }
    json.dumps(body)  # what httpx sends


def test_v2_answers_count_the_labels():
    response = {
        "model_name": "intent",
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [2, 6], "data": [0.1] * 12},
            {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["billing", "delivery"]},
        ],
    }
    assert peer.V2.answers(response) == 2


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"error": "boom"}, KeyError),
        ({"outputs": "nope"}, TypeError),
        ({"outputs": [{"name": "probabilities", "data": [0.5]}]}, KeyError),
        ({"outputs": [{"name": "label", "data": "billing"}]}, TypeError),
    ],
)
def test_v2_answers_refuse_bodies_without_labels(body, error):
    # The load generator counts these exceptions as bad bodies: they must be these types.
    with pytest.raises(error):
        peer.V2.answers(body)


def test_infer_url():
    assert peer.infer_url("http://127.0.0.1:8123") == "http://127.0.0.1:8123/v2/models/intent/infer"


# --- the settings it writes --------------------------------------------------------------------


def _fake_fetch(calls: list[str], root: Path):
    def fetch(uri: str) -> tuple[ModelRef, Path]:
        calls.append(uri)
        name = uri.split("/")[1].split("@")[0]
        folder = root / name
        folder.mkdir(exist_ok=True)
        return ModelRef(name=name, version="7", uri=uri, aliases=("champion",)), folder

    return fetch


def test_runtime_parameters_hand_folders_and_versions(tmp_path):
    from bench.pipeline import load_spec

    calls: list[str] = []
    params = peer.runtime_parameters(
        load_spec(ROOT / "serve_config.yaml"), _fake_fetch(calls, tmp_path)
    )
    stages = {s["deployment"]: s for s in params["stages"]}
    assert list(stages) == STAGES
    # The tokenizer and the encoder share one registered model: fetched once.
    assert sorted(calls) == sorted(set(calls))
    assert "models:/intent-encoder@champion" in calls
    for name in STAGES[:-1]:
        kwargs = stages[name]["init_kwargs"]
        assert "model_uri" not in kwargs
        assert Path(kwargs["model_dir"]).is_dir()
    assert stages["Encoder"]["init_kwargs"]["model_dir"] == str(tmp_path / "intent-encoder")
    assert stages["Ensemble"]["init_kwargs"]["weights"] == {"linear": 0.35, "mlp": 0.35, "bow": 0.3}
    assert stages["Ensemble"]["members"] == ["linear", "mlp", "bow"]
    assert stages["LinearHead"]["output_prefix"] == "linear."
    assert [m["stage"] for m in params["models"]] == STAGES[:-1]
    assert params["models"][0] == {
        "stage": "Tokenizer",
        "name": "intent-encoder",
        "version": "7",
        "uri": "models:/intent-encoder@champion",
        "aliases": ["champion"],
    }
    json.dumps(params)  # it travels in model-settings.json


def test_runtime_parameters_refuse_pyfunc_members(tmp_path):
    from servecore.pipeline.spec import PipelineSpec

    spec = PipelineSpec(
        members=[
            {
                "name": "sk",
                "deployment": "SkMember",
                "input": "text",
                "model_uri": "models:/sk@champion",
                "flavor": "pyfunc",
            }
        ],
        ensemble={"weights": {"sk": 1.0}},
    )
    with pytest.raises(ValueError, match="no MLflow"):
        peer.runtime_parameters(spec, _fake_fetch([], tmp_path))


def test_write_settings(tmp_path):
    params = {"stages": [{"deployment": "Ensemble"}], "models": []}
    settings_path, model_path = peer.write_settings(tmp_path / "run", params, 18080, 18081)
    settings = json.loads(settings_path.read_text())
    model = json.loads(model_path.read_text())
    assert settings_path.parent == model_path.parent.parent == tmp_path / "run"
    assert settings["host"] == "127.0.0.1"
    assert (settings["http_port"], settings["grpc_port"]) == (18080, 18081)
    assert settings["metrics_endpoint"] is None
    # Everything MLServer writes stays in the run folder, never in the checkout.
    for key in ("metrics_dir", "environments_dir", "model_repository_root"):
        assert Path(settings[key]).is_relative_to(tmp_path / "run")
    assert settings["parallel_workers"] == peer.PARALLEL_WORKERS
    assert model["name"] == "intent"
    assert model["max_batch_size"] == MAX_BATCH_TEXTS == 32
    assert model["max_batch_time"] == MAX_WAIT_S == 0.005
    assert model["parameters"]["extra"] == params
    assert model["implementation"] == peer.RUNTIME


def test_the_runtime_named_in_the_settings_exists():
    module, _, cls = peer.RUNTIME.rpartition(".")
    source = ROOT / Path(*module.split(".")).with_suffix(".py")
    tree = ast.parse(source.read_text())
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert cls in classes


# --- the environment ---------------------------------------------------------------------------


def test_requirements_pin_ours_with_torch_first():
    from importlib import metadata

    reqs = peer.requirements()
    assert reqs[0] == f"torch=={metadata.version('torch').split('+')[0]}"
    assert "mlserver==1.7.1" in reqs
    assert f"transformers=={metadata.version('transformers')}" in reqs
    assert not any(r.startswith("mlflow") for r in reqs)


def test_ensure_env_reports_a_python_it_cannot_run(tmp_path):
    result = peer.ensure_env(tmp_path / "venv", base_python=tmp_path / "no-such-python")
    assert isinstance(result, str)
    assert "no-such-python" in result
    assert "\n" not in result


def _fake_python(path: Path, version: str) -> Path:
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def test_ensure_env_refuses_a_python_mlserver_does_not_support(tmp_path):
    python = _fake_python(tmp_path / "python3.13", "3 13")
    result = peer.ensure_env(tmp_path / "venv", base_python=python)
    assert isinstance(result, str)
    assert "3.13" in result and "3.9-3.12" in result
    assert not (tmp_path / "venv").exists()


def test_ensure_env_reports_a_pip_failure_with_its_log(tmp_path):
    venv = tmp_path / "venv"
    # --no-index: nothing is asked of any registry; the package exists nowhere on this disk.
    result = peer.ensure_env(
        venv, reqs=["bench-mlserver-test-absent==0.0.0"], pip_options=["--no-index"], timeout_s=120
    )
    assert isinstance(result, str)
    assert "install bench-mlserver-test-absent==0.0.0 failed" in result
    log = tmp_path / "venv.log"
    assert str(log) in result
    assert "bench-mlserver-test-absent" in log.read_text()
    assert not (venv / peer.MARKER).exists()  # a failed build is never reused


def test_ensure_env_stops_pip_at_its_time_bound(tmp_path):
    python = tmp_path / "slow-python"
    # Says a supported version, creates a "venv", then hangs in what ensure_env runs as pip.
    python.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            case "$2" in
              venv) mkdir -p "$3/bin" && ln -s "$0" "$3/bin/python" ;;
              pip) exec sleep 30 ;;
              *) echo 3 11 ;;
            esac
            """
        )
    )
    python.chmod(0o755)
    started = time.monotonic()
    result = peer.ensure_env(tmp_path / "venv", base_python=python, reqs=["x"], timeout_s=1)
    assert time.monotonic() - started < 20
    assert isinstance(result, str)
    assert "install x took over 1s" in result


def test_ensure_env_reuses_a_verified_env_and_rebuilds_a_changed_one(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _fake_python(venv / "bin" / "python", "3 11")
    (venv / peer.MARKER).write_text(json.dumps({"requirements": ["a==1"], "pip_options": []}))
    bogus = tmp_path / "no-such-python"
    # Same requirements: reused as it is (the bogus base python is never run).
    assert peer.ensure_env(venv, base_python=bogus, reqs=["a==1"]) == venv / "bin" / "python"
    # Changed requirements: rebuilt, which needs the base python.
    result = peer.ensure_env(venv, base_python=bogus, reqs=["a==2"])
    assert isinstance(result, str) and "no-such-python" in result


# --- the server process ------------------------------------------------------------------------


def _stand_in(tmp_path: Path, script: str) -> Path:
    """A fake venv whose ``bin/mlserver`` is ``script``; returns its ``bin/python``."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    mlserver = bin_dir / "mlserver"
    mlserver.write_text(script)
    mlserver.chmod(0o755)
    return bin_dir / "python"


@pytest.fixture
def no_registry(monkeypatch):
    monkeypatch.setattr(peer, "runtime_parameters", lambda spec: {"stages": [], "models": []})


def test_server_that_exits_fails_with_its_log(tmp_path, no_registry):
    python = _stand_in(tmp_path, "#!/bin/sh\necho 'cannot import runtime' >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match=r"status 3[\s\S]*cannot import runtime"):
        with peer.mlserver_server(ROOT / "serve_config.yaml", tmp_path, python, 30):
            pytest.fail("yielded a server that exited")


def test_server_never_ready_is_stopped_with_its_children(tmp_path, no_registry):
    pid_file = tmp_path / "child.pid"
    python = _stand_in(tmp_path, f"#!/bin/sh\nsleep 120 &\necho $! > {pid_file}\nwait\n")
    with pytest.raises(TimeoutError, match="not ready"):
        with peer.mlserver_server(ROOT / "serve_config.yaml", tmp_path, python, 2):
            pytest.fail("yielded a server that never answered")
    child = int(pid_file.read_text())
    _assert_gone(child)


def test_server_yields_once_ready_and_is_stopped_on_exit(tmp_path, no_registry):
    # A stand-in that answers both readiness endpoints on the port from settings.json.
    server = textwrap.dedent(
        f"""\
        #!{sys.executable}
        import http.server, json, os, sys
        settings = json.load(open(os.path.join(sys.argv[2], "settings.json")))
        class Ready(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path in ("/v2/health/ready", "/v2/models/intent/ready")
                self.send_response(200 if ok else 404)
                self.end_headers()
            def log_message(self, *args):
                pass
        with open("server.pid", "w") as f:
            f.write(str(os.getpid()))
        http.server.HTTPServer((settings["host"], settings["http_port"]), Ready).serve_forever()
        """
    )
    python = _stand_in(tmp_path, server)
    with peer.mlserver_server(ROOT / "serve_config.yaml", tmp_path, python, 30) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        pid = int((tmp_path / "mlserver" / "server.pid").read_text())
        os.kill(pid, 0)  # running
    _assert_gone(pid)


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie child of an exited parent is reaped by init shortly.
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"process {pid} outlived the server")


# --- the runtime (only where MLServer is installed) --------------------------------------------


def test_runtime_decodes_text_and_refuses_bad_input():
    pytest.importorskip("mlserver")
    from mlserver.errors import MLServerError
    from mlserver.types import InferenceRequest

    from bench.mlserver_runtime import decode_texts

    good = InferenceRequest(**peer.V2.body(["a", "b"]))
    assert decode_texts(good) == ["a", "b"]
    bad_bodies = [
        {"inputs": [{"name": "other", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [1]}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]},
    ]
    for body in bad_bodies:
        with pytest.raises(MLServerError) as caught:
            decode_texts(InferenceRequest(**body))
        assert 400 <= caught.value.status_code < 500
