"""Jobs on the production broker: a real ``redis-server`` on 127.0.0.1, and runner replicas that
scale with the job backlog (:class:`servecore.jobs.autoscaling.JobQueuePolicy`).

The graph is the real gateway, stage wrapper and job runner around the fake stage classes of
``tests/fixtures.py`` (one of them slow), so the app deploys in seconds and jobs last long enough
for the backlog to be seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from servecore.config_check import load_app_spec
from servecore.dataset import load_split
from servecore.settings import Settings, get_settings
from tests.conftest import ROOT, free_port
from tests.fixtures import delete_app, fake_graph
from tests.jobs_support import (
    FAST_RUNNER,
    assert_same_answers,
    jobs_env,
    online,
    store_url,
    wait_job,
    wait_until,
)

pytestmark = pytest.mark.serve

APP = "jobs-redis"
# A slow member keeps each job busy long enough for the backlog to be seen.
SLOW_MEMBER = {"LinearHead": ("tests.fixtures:SlowModel", {"seconds": 0.25})}
"""A slow head builds a backlog of jobs; the real bag-of-words model (taken from the spec) makes
the answers differ from text to text, so a job's answers can be told from another's."""


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """``INTENT_TEST_REDIS_URL`` (``.ci/run`` starts one), else a private ``redis-server``."""
    given = os.environ.get("INTENT_TEST_REDIS_URL")
    if given:
        yield given
        return
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide redis-server (see .ci/run)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        wait_until(lambda: _pings(client), 10, "redis-server to answer")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def app(serve_instance, redis_url, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    from ray import serve

    from deployments.job_runner import job_runner_deployment

    env = jobs_env(tmp_path_factory.mktemp("jobs-redis"), broker_url=redis_url)
    options = {
        "num_cpus": 0,
        "num_gpus": 0,
        "runtime_env": {"env_vars": {**env, "PYTHONPATH": str(ROOT)}},
    }
    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    runner = job_runner_deployment(Settings(**_settings_fields(env))).options(
        ray_actor_options=options,
        user_config={**FAST_RUNNER, "chunk_size": 16},
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 600,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
            "policy": {
                "policy_function": "servecore.jobs.autoscaling:JobQueuePolicy",
                "policy_kwargs": {"store_url": store_url(env), "jobs_per_replica": 1},
            },
        },
    )
    bow = next(plan for plan in spec.stage_plans() if plan.deployment == "BagOfWords")
    real_bow = {"BagOfWords": (bow.stage_class, bow.init_kwargs)}
    gateway = fake_graph(
        spec, {**SLOW_MEMBER, **real_bow}, actor_options=options, job_runner=runner.bind()
    )
    serve.run(gateway, name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance.base_url}/{APP}", env
    delete_app(APP)
    get_settings.cache_clear()


def _settings_fields(env: dict[str, str]) -> dict[str, str]:
    prefix = "INTENT_SERVING_"
    return {k.removeprefix(prefix).lower(): v for k, v in env.items()}


def _running_runners() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["JobRunner"]
    return int(deployment.replica_states.get("RUNNING", 0))


def test_jobs_go_through_redis_and_runners_scale_with_the_backlog(app, redis_url):
    import redis

    url, _ = app
    assert _running_runners() == 1
    texts, _ = load_split("train")  # 840 real messages: six jobs of 64 different ones
    chunks = [texts[64 * i : 64 * (i + 1)] for i in range(6)]
    ids = []
    for chunk in chunks:
        response = httpx.post(f"{url}/v1/jobs", json={"texts": chunk}, timeout=30)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    wait_until(lambda: _running_runners() == 2, 90, "a second JobRunner replica")
    finished = [wait_job(url, job_id, timeout_s=180) for job_id in ids]
    assert [j["state"] for j in finished] == ["succeeded"] * 6, finished
    for i, job in enumerate(finished):
        predictions = job["result"]["predictions"]
        assert len(predictions) == 64
        assert_same_answers(predictions, online(url, chunks[i]))
    assert len({p["label"] for j in finished for p in j["result"]["predictions"]}) > 1
    # The queue really lived in Redis: kombu keeps the queue's binding there.
    assert redis.Redis.from_url(redis_url).exists("_kombu.binding.intent-jobs")
