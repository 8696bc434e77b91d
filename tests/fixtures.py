"""Fake stage classes for fault tests: tiny, instant, no weights — and one that fails, one slow.

They speak the same batch layout as the real classes, so the real Serve wrapper and gateway run
around them unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from servecore import LABELS
from servecore.pipeline.batching import Batch, num_rows

FAKE_STAGES = {
    "Tokenizer": ("tests.fixtures:FakeTokenizer", {}),
    "Encoder": ("tests.fixtures:FakeEncoder", {}),
    "LinearHead": ("tests.fixtures:UniformModel", {}),
    "MLPHead": ("tests.fixtures:UniformModel", {}),
    "BagOfWords": ("tests.fixtures:UniformModel", {}),
}
"""Stage class and kwargs per deployment of the shipped spec, for a graph that deploys in seconds
(the ensemble stays real)."""


class FakeTokenizer:
    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"input_ids": np.ones((n, 2), np.int64), "attention_mask": np.ones((n, 2), np.int64)}


class FakeEncoder:
    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"embedding": np.zeros((n, 4), np.float32), "num_tokens": np.full(n, 2, np.int64)}


class UniformModel:
    """Any member: every label equally likely."""

    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        return {"probs": np.full((n, len(LABELS)), 1 / len(LABELS), np.float32)}


class SlowModel(UniformModel):
    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds

    def __call__(self, batch: Batch) -> Batch:
        time.sleep(self.seconds)
        return super().__call__(batch)


class ScriptedModel(UniformModel):
    """A stage that does what a script file says, read at every call, so that one deployment
    serves every fault test: ``{"<name>": {"mode": "error"}}`` fails, ``{"<name>": {"mode":
    "slow", "seconds": 5}}`` sleeps first (until the script changes), anything else answers
    like ``inner`` (a stage class path) or else :class:`UniformModel`. Every call appends its
    row count to ``calls-<name>.log`` beside the script."""

    def __init__(
        self,
        script: str,
        name: str,
        inner: str | None = None,
        inner_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.script = Path(script)
        self.name = name
        self.calls = self.script.with_name(f"calls-{name}.log")
        self.inner = None
        if inner is not None:  # act as this stage class otherwise (e.g. the real ensemble)
            from servecore.pipeline.spec import load_stage_class

            self.inner = load_stage_class(inner)(**(inner_kwargs or {}))

    def _mode(self) -> dict[str, Any]:
        try:
            return json.loads(self.script.read_text()).get(self.name, {})
        except (OSError, ValueError):
            return {}

    def __call__(self, batch: Batch) -> Batch:
        with self.calls.open("a") as f:
            f.write(f"{num_rows(batch)}\n")
        mode = self._mode()
        if mode.get("mode") == "error":
            raise RuntimeError("injected failure: secret internal detail")
        if mode.get("mode") == "slow":
            deadline = time.monotonic() + float(mode["seconds"])
            while time.monotonic() < deadline and self._mode() == mode:
                time.sleep(0.05)
        return super().__call__(batch) if self.inner is None else self.inner(batch)


class VersionedHead:
    """A head stage whose behaviour depends on the registered version it was loaded for, so a
    rollout's candidate can be scripted: it names one label per text (a hash of the text) with
    certainty, and does what ``script`` says for its version, read at every call:
    ``{"<version>": {"mode": "error", "rate": 0.5}}`` fails that share of calls,
    ``{"mode": "slow", "seconds": 0.3}`` sleeps first, ``{"mode": "flip"}`` names another label.
    It loads no weights: the registered version only has to exist."""

    def __init__(self, model_uri: str, script: str) -> None:
        import random

        from servecore.registry.client import resolve

        self.model_ref = resolve(model_uri)
        self.script = Path(script)
        self.rng = random.Random()

    def _mode(self) -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads(self.script.read_text())
        except (OSError, ValueError):
            return {}
        return dict(found.get(self.model_ref.version, {}))

    def __call__(self, batch: Batch) -> Batch:
        import zlib

        mode = self._mode()
        if mode.get("mode") == "error" and self.rng.random() < float(mode.get("rate", 1.0)):
            raise RuntimeError(f"injected failure of version {self.model_ref.version}")
        if mode.get("mode") == "slow":
            time.sleep(float(mode["seconds"]))
        shift = 1 if mode.get("mode") == "flip" else 0
        texts = [str(t) for t in batch["text"]] if "text" in batch else None
        n = num_rows(batch)
        probs = np.zeros((n, len(LABELS)), np.float32)
        for i in range(n):
            key = zlib.crc32(texts[i].encode()) if texts is not None else i
            probs[i, (key + shift) % len(LABELS)] = 1.0
        return {"probs": probs}


def write_script(script: Path, **stages: dict[str, Any]) -> None:
    """Set what every :class:`ScriptedModel` reading ``script`` does (none named: answer)."""
    partial = script.with_suffix(".part")
    partial.write_text(json.dumps(stages))
    partial.replace(script)  # atomic: a replica never reads half a script


def fake_graph(
    spec: Any,
    overrides: dict[str, tuple[str, dict]] | None = None,
    gateway_config: dict | None = None,
    actor_options: dict | None = None,
    job_runner: Any = None,
    gateway_options: dict | None = None,
    stage_options: dict[str, dict] | None = None,
    version: str | None = None,
    streams: Any = None,
) -> Any:
    """The real gateway and stage wrapper around :data:`FAKE_STAGES`, bound as an application,
    one deployment per stage group of ``spec`` (per stage when it has no groups).

    ``overrides`` replaces stages by stage name; stages in neither (the ensemble, extra
    members) run their real class from the spec. Every replica asks for no CPU.
    ``gateway_options`` are more ``Gateway.options`` (queue limits, back-pressure answer);
    ``stage_options`` more ``Stage.options`` per group name (replicas, health checks);
    a ``ray_actor_options`` in either is merged over ``actor_options``.
    ``streams`` is a bound ``StreamConsumer`` (the gateway's ``GET /v1/streams`` asks it).
    With a ``version``, running the graph again with only a new ``gateway_config`` is a live
    update of the gateway rather than a restart of every replica: ``serve.run`` gives every
    deployment a random version unless one is set, and the public option is gone, so this
    sets the internal one (tests only).
    """
    from dataclasses import replace

    from deployments.gateway import Gateway
    from deployments.stage import Stage
    from servecore.pipeline.spec import GroupPlan

    options = actor_options or {"num_cpus": 0, "num_gpus": 0}
    chosen = {**FAKE_STAGES, **(overrides or {})}
    stages = {}
    for group in spec.group_plans():
        plans = []
        for plan in group.stages:
            stage_class, kwargs = chosen.get(plan.deployment, (plan.stage_class, plan.init_kwargs))
            plans.append(replace(plan, stage_class=stage_class, init_kwargs=kwargs))
        more = dict((stage_options or {}).get(group.name, {}))
        actor = {**options, **more.pop("ray_actor_options", {})}
        stage = Stage.options(name=group.name, ray_actor_options=actor, **more)
        stages[group.name] = _pinned(stage, version).bind(GroupPlan(group.name, tuple(plans)))
    gateway_more = dict(gateway_options or {})
    gateway = Gateway.options(
        name="Gateway",
        ray_actor_options={**options, **gateway_more.pop("ray_actor_options", {})},
        user_config=gateway_config or {},
        **gateway_more,
    )
    return _pinned(gateway, version).bind(spec.model_dump(), stages, job_runner, None, streams)


def _pinned(deployment: Any, version: str | None) -> Any:
    return deployment if version is None else deployment.options(version=version, _internal=True)


class Sleeper:
    """A bare HTTP deployment body that sleeps ``seconds`` per request and notes in ``record``
    whether its request finished or was cancelled (to watch the proxy's request timeout)."""

    def __init__(self, record: str, seconds: float = 60.0) -> None:
        self.record = Path(record)
        self.seconds = seconds

    async def __call__(self, request: Any) -> str:
        import asyncio

        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.record.write_text("cancelled")
            raise
        self.record.write_text("finished")
        return "finished"


def delete_app(name: str) -> None:
    """Delete a test app without waiting out its gateway's drain period (5 s in
    ``graphs.deploy.SERVE_ENV``, per ingress replica): its replicas ask for no CPU, so the next
    module's app does not need them gone first, and the session's ``serve.shutdown`` waits for
    whatever is still draining."""
    from ray import serve

    serve.delete(name, _blocking=False)


def driver_handle(deployment: str, app: str) -> Any:
    """A handle to ``deployment`` of ``app`` that blocking code (a test) can call.

    The cluster runs in Ray's throughput profile, under which a handle's router shares the
    caller's event loop; ``make test`` exports that profile to the test process too, and a test
    has no running loop. A router loop of its own, as the job runner's threads use."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app)  # Serve caches it
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def await_knobs(app: str, wanted: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait until the app's gateway applies ``wanted`` (a subset of its ``user_config``, as
    :class:`deployments.gateway.GatewayUserConfig` dumps it): Serve calls ``reconfigure`` a
    moment after a deploy returns. Returns the knobs seen."""
    gateway = driver_handle("Gateway", app)
    deadline = time.monotonic() + timeout_s
    while True:
        knobs: dict[str, Any] = gateway.current_knobs.remote().result(timeout_s=timeout_s)
        if _contains(knobs, wanted):
            return knobs
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway of {app} never applied {wanted}: {knobs}")
        time.sleep(0.2)


def _contains(found: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(found, dict) and all(
            k in found and _contains(found[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(found, list)
            and len(found) == len(wanted)
            and all(_contains(f, w) for f, w in zip(found, wanted, strict=True))
        )
    return bool(found == wanted)


def scrape(port: int) -> dict[str, float]:
    """Family → the largest sample value of any of its series (histograms: ``_count``) on a
    node's Prometheus endpoint."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
    largest: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("ray_intent_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        largest[name] = max(largest.get(name, 0.0), value)
    return largest


def run_report(command: list[str], timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run a drill (``python -m ...``) in a child process and return its report: the last JSON
    line on its stdout (Ray writes there too). On a timeout the drill gets SIGTERM first (it shuts
    Serve and its nodes down on it; SIGKILL would orphan them). Fails the test when the drill
    fails, with the tail of its stderr."""
    import signal
    import subprocess

    import pytest

    process = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"{command} ran past {timeout_s}s; stderr tail:\n{stderr[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    if process.returncode != 0 or not report.get("ok"):
        pytest.fail(f"{command} failed (exit {process.returncode}): {report}\n{stderr[-4000:]}")
    report["stderr_tail"] = stderr[-4000:]
    return report
