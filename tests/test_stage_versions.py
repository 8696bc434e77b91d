"""The per-replica cache of loaded model versions behind the stage wrapper (plain asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.stage import LoadedModel, LoadedVersions


def test_concurrent_callers_share_one_load_and_the_least_recent_version_goes_first():
    loads: list[str] = []

    async def scenario() -> None:
        cache = LoadedVersions(capacity=2)

        def loader(key: str):
            async def load() -> LoadedModel:
                loads.append(key)
                await asyncio.sleep(0.01)
                return LoadedModel(model=key, info={"version": key})

            return load

        first = await asyncio.gather(*(cache.get("v1", loader("v1")) for _ in range(5)))
        assert {loaded.model for loaded in first} == {"v1"}
        await cache.get("v2", loader("v2"))
        await cache.get("v1", loader("v1"))  # v1 is now the most recent
        await cache.get("v3", loader("v3"))
        assert cache.keys() == ["v1", "v3"]
        cache.resize(1)
        assert cache.keys() == ["v3"]

    asyncio.run(scenario())
    assert loads == ["v1", "v2", "v3"]


def test_a_failed_load_is_not_cached_and_an_abandoned_one_still_is():
    async def scenario() -> None:
        cache = LoadedVersions(capacity=3)
        attempts = 0

        async def flaky() -> LoadedModel:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise OSError("registry unreachable")
            return LoadedModel(model="ok", info=None)

        with pytest.raises(OSError):
            await cache.get("v1", flaky)
        assert "v1" not in cache
        assert (await cache.get("v1", flaky)).model == "ok"

        async def slow() -> LoadedModel:
            await asyncio.sleep(0.05)
            return LoadedModel(model="slow", info=None)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cache.get("v2", slow), 0.01)
        await asyncio.sleep(0.1)
        assert "v2" in cache

    asyncio.run(scenario())


def test_poll_ticks_follow_the_live_interval_and_pause_at_zero(monkeypatch):
    from servecore.traffic import releases

    monkeypatch.setattr(releases, "IDLE_RECHECK_S", 0.01)
    interval = [0.0]

    async def scenario() -> None:
        ticks = releases.poll_ticks(lambda: interval[0])
        with pytest.raises(TimeoutError):  # off: no tick however long we wait
            await asyncio.wait_for(anext(ticks), 0.1)
        interval[0] = 0.01
        ticks = releases.poll_ticks(lambda: interval[0])
        await asyncio.wait_for(anext(ticks), 1.0)

    asyncio.run(scenario())


def test_a_kind_that_fails_fails_only_its_own_calls_in_a_shared_batch():
    """Calls pinned to a version that cannot load (a broken shadow, say) share a Serve batch with
    the champion's calls; only theirs fail."""
    import collections

    import numpy as np

    from deployments.stage import Interest, Stage

    class Models:
        async def model_for(self, pin: str | None) -> LoadedModel:
            if pin == "broken":
                raise FileNotFoundError("no MLmodel in the broken version's folder")
            return LoadedModel(model=pin, info={"version": pin})

    def chain(batch, run, models, wanted, timings, abandoned):
        return {"answer": np.asarray([f"{models['Head']}:{t}" for t in batch["text"]])}

    stage = Stage.func_or_class.__new__(Stage.func_or_class)
    stage.stages = {"Head": Models()}
    stage.chain = chain
    stage.name = "Pipeline"
    stage._recent_batches = collections.deque(maxlen=8)

    def call(text: str, pin: str):
        batch = {"text": np.asarray([text], dtype=object)}
        return (batch, (("Head", pin),), ("Head",), None, Interest())

    calls = [call("a", "v1"), call("b", "broken"), call("c", "v1")]
    results = asyncio.run(Stage.func_or_class._run_batch.__wrapped__(stage, calls))
    assert [r[0]["answer"].tolist() for r in (results[0], results[2])] == [["v1:a"], ["v1:c"]]
    assert results[0][1] == {"Head": {"version": "v1"}}
    assert isinstance(results[1], FileNotFoundError)
