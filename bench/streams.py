"""The stream path, measured: Redis stream in, the served graph, one result per message out.

A private ``redis-server`` (append-only file on, fsync every second: how production should run
it) and the shipped config with a ``StreamConsumer`` added (one replica, the shipped knobs) on a
private Ray cluster. The gateway's response cache is off, as the HTTP rows ask with
``Cache-Control: no-cache``, so every message goes through the models.

* **Saturation.** A backlog of messages is put on the stream at once; the rate is messages over
  the time from the first message's id (when Redis took it in) to the last result's write, both
  clocks Redis's own. Compared with the raw in-process rate (target ≥ 0.85).
* **Steady offered rate.** Messages paced at half the saturation rate for a fixed time; the
  latency is each result's ``latency_ms`` (message id time → result write: queueing, the
  consumer's read, the graph and the write).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.loadgen import percentiles

logger = logging.getLogger("bench")

INPUT = "bench"
OUTPUT = f"{INPUT}:results"
DEAD = f"{INPUT}:dead"
STEADY_SHARE = 0.5
"""The steady offered rate, as a share of the measured saturation rate."""


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private ``redis-server`` on 127.0.0.1, stopped (by PID) and removed on exit."""
    from bench.served import LOOPBACK, free_port

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", LOOPBACK, "--port", str(port), "--dir", str(folder),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://{LOOPBACK}:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def stream_config(config: Path, folder: Path) -> Path:
    """``config`` with a stream consumer on the intent app and the response cache off."""
    from servecore.config_check import load_config

    loaded = load_config(config)
    (app,) = [a for a in loaded["applications"] if a["name"] == "intent"]
    for deployment in app["deployments"]:
        if deployment["name"] == "Gateway":
            knobs = deployment.setdefault("user_config", {})
            knobs["cache"] = {**knobs.get("cache", {}), "enabled": False}
    app["deployments"].append(
        {
            "name": "StreamConsumer",
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
            "user_config": {"streams": [{"input": INPUT}]},
        }
    )
    path = folder / "serve_config.streams.yaml"
    path.write_text(yaml.safe_dump(loaded, sort_keys=False))
    return path


def _wait_results(client: Any, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while client.xlen(OUTPUT) + client.xlen(DEAD) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{client.xlen(OUTPUT)} results and {client.xlen(DEAD)} dead letters after "
                f"{timeout_s:.0f}s; expected {expected}"
            )
        time.sleep(0.05)


def _results_after(client: Any, last_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
    found = client.xrange(OUTPUT, min=f"({last_id}", max="+")
    return [(entry_id.decode(), fields) for entry_id, fields in found]


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _last_id(client: Any) -> str:
    newest = client.xrevrange(OUTPUT, count=1)
    return newest[0][0].decode() if newest else "0-0"


def _send(client: Any, texts: Sequence[str]) -> list[str]:
    pipe = client.pipeline(transaction=False)
    for text in texts:
        pipe.xadd(INPUT, {"text": text})
    return [i.decode() for i in pipe.execute()]


def _done(client: Any) -> int:
    return int(client.xlen(OUTPUT)) + int(client.xlen(DEAD))


def _keep_busy(client: Any, pool: Sequence[str], seconds: float, backlog: int = 256) -> None:
    """Keep about ``backlog`` messages waiting for ``seconds``, then wait for all of them."""
    start, sent, done_before = time.monotonic(), 0, _done(client)
    while time.monotonic() - start < seconds:
        if sent - (_done(client) - done_before) < backlog:
            _send(client, [pool[(sent + i) % len(pool)] for i in range(backlog // 2)])
            sent += backlog // 2
        time.sleep(0.05)
    _wait_results(client, done_before + sent, 300)


def bench_streams(
    config: Path,
    texts: list[str],
    messages: int,
    steady_s: float,
    warmup_s: float,
    max_settle_s: float,
) -> dict[str, dict[str, Any]]:
    import redis

    from bench.served import (
        _environment,
        _settled,
        cpu_breakdown,
        cpu_seconds_by_process,
        encoder_replicas,
        serve_graph,
    )

    pool = [texts[i % len(texts)] for i in range(messages)]
    folder = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    with redis_server() as url, _environment({"INTENT_SERVING_STREAMS_URL": url}):
        with serve_graph(stream_config(config, folder)) as graph:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 120
            while not client.exists(INPUT):  # the consumer creates the stream and its group
                if time.monotonic() > deadline:
                    raise RuntimeError("the stream consumer never created its group")
                time.sleep(0.2)
            # Warm up under a backlog while the encoder autoscaler moves, as the HTTP rows do.
            _keep_busy(client, pool, warmup_s)
            settle_started = time.monotonic()
            replicas = encoder_replicas(graph.encoder_group)
            while not _settled(replicas) and time.monotonic() - settle_started < max_settle_s:
                logger.info("stream: encoder not settled yet (%s); more warm-up", replicas)
                _keep_busy(client, pool, 5.0)
                replicas = encoder_replicas(graph.encoder_group)
            logger.info("stream warm-up done: %d answered, encoder %s", _done(client), replicas)
            before_cpu = cpu_seconds_by_process()

            # Saturation: a backlog at once; the rate on Redis's clock.
            done_before, since = client.xlen(OUTPUT) + client.xlen(DEAD), _last_id(client)
            ids = _send(client, pool[:messages])
            _wait_results(client, done_before + messages, 600)
            written = _results_after(client, since)
            took_ms = _entry_ms(written[-1][0]) - _entry_ms(ids[0])
            rate = len(written) / (took_ms / 1000.0)
            dead = client.xlen(DEAD)
            cpu = cpu_breakdown(before_cpu, cpu_seconds_by_process(), messages)
            after = encoder_replicas(graph.encoder_group)
            logger.info(
                "stream saturation: %.1f messages/s (%d in %.1fs)", rate, messages, took_ms / 1000
            )
            saturation = {
                "unit": "texts/s",
                "texts_per_s": rate,
                "requests_per_s": rate,
                "requests": messages,
                "errors": dead + messages - len(written),
                **percentiles([float(f[b"latency_ms"]) / 1000.0 for _, f in written]),
                "detail": {
                    "latency_is": "end to end per message (id time to result write), backlog",
                    "consumer": {"replicas": 1, "batch_size": 64, "max_in_flight": 2},
                    "encoder": {"before": replicas, "after": after},
                    "cpu_ms_per_message": cpu,
                },
            }

            # A steady offered rate, paced from here.
            offered = max(1.0, STEADY_SHARE * rate)
            count = max(1, int(offered * steady_s))
            since = _last_id(client)
            done_before = client.xlen(OUTPUT) + client.xlen(DEAD)
            started = time.perf_counter()
            for i in range(count):
                wait = started + i / offered - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                client.xadd(INPUT, {"text": pool[i % len(pool)]})
            _wait_results(client, done_before + count, 300)
            written = _results_after(client, since)
            latencies = [float(f[b"latency_ms"]) / 1000.0 for _, f in written]
            achieved = len(written) / (time.perf_counter() - started)
            steady = {
                "unit": "texts/s",
                "texts_per_s": achieved,
                "requests_per_s": achieved,
                "requests": count,
                "errors": client.xlen(DEAD) - dead + count - len(written),
                **percentiles(latencies),
                "detail": {
                    "offered_per_s": offered,
                    "seconds": steady_s,
                    "latency_is": "end to end per message (id time to result write)",
                },
            }
            logger.info(
                "stream steady at %.1f/s: p50 %.1f ms, p99 %.1f ms",
                offered,
                steady["p50_ms"],
                steady["p99_ms"],
            )
    shutil.rmtree(folder, ignore_errors=True)
    return {"stream_saturation": saturation, "stream_steady": steady}
