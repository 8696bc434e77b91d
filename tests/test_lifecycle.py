"""Model lifecycle against a real MLflow store and real Serve deployments: alias moves through the
``servecore.registry.models`` commands, served live under load, and rolled back.

A second version of the linear head is registered for these tests (the first one's weights scaled,
so its probabilities differ and every answer can be matched to the version it names). The
session's registry is shared, so every test puts the ``champion`` aliases back where it found them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from servecore.errors import RegistryError
from servecore.registry import models as cli
from servecore.registry.client import _local_path, get_client, pyfunc_artifact
from tests.conftest import ROOT

LINEAR = "intent-head-linear"
TEXTS = ["my card was charged twice for one order", "how do I reset my password"]


def register_scaled_copy(name: str, factor: float, folder: Path) -> str:
    """A new version of ``name``: the champion's files, every weight multiplied by ``factor``."""
    from safetensors.torch import load_file, save_file

    client = get_client()
    champion = client.get_model_version_by_alias(name, "champion")
    source = _local_path(client.get_model_version_download_uri(name, champion.version))
    assert source is not None
    shutil.copytree(source, folder)
    weights = pyfunc_artifact(folder, "head") / "weights.safetensors"
    save_file({k: v * factor for k, v in load_file(str(weights)).items()}, str(weights))
    created = client.create_model_version(name, source=str(folder), run_id=champion.run_id)
    return str(created.version)


@pytest.fixture(scope="module")
def second_linear(registry, tmp_path_factory) -> Iterator[str]:
    version = register_scaled_copy(LINEAR, 0.5, tmp_path_factory.mktemp("variant") / "model")
    yield version
    get_client().delete_model_version(LINEAR, version)  # the registry is shared by the session


@pytest.fixture
def restore_aliases(registry) -> Iterator[None]:
    client = get_client()
    names = [m.name for m in client.search_registered_models()]
    before = {n: dict(client.get_registered_model(n).aliases or {}) for n in names}
    tags = {n: dict(client.get_registered_model(n).tags or {}) for n in names}
    yield
    for name, aliases in before.items():
        for alias, version in aliases.items():
            client.set_registered_model_alias(name, alias, version)
        for alias in set(client.get_registered_model(name).aliases or {}) - set(aliases):
            client.delete_registered_model_alias(name, alias)
        for key in client.get_registered_model(name).tags or {}:
            if key.startswith("alias_history.") and key not in tags[name]:
                client.delete_registered_model_tag(name, key)


# --- the command --------------------------------------------------------------------------------


def test_promote_and_rollback_move_the_alias_and_remember_the_way_back(
    second_linear, restore_aliases, capsys
):
    client = get_client()
    first = str(client.get_model_version_by_alias(LINEAR, "champion").version)
    assert cli.main(["promote", LINEAR, second_linear]) == 0
    assert (
        f"{LINEAR}@champion: version {first} -> version {second_linear}" in capsys.readouterr().out
    )
    assert str(client.get_model_version_by_alias(LINEAR, "champion").version) == second_linear
    assert cli.history(client, LINEAR) == [first]

    # Promoting the version the alias already names changes nothing and records nothing.
    assert cli.main(["promote", f"{LINEAR}={second_linear}"]) == 0
    assert "(unchanged)" in capsys.readouterr().out
    assert cli.history(client, LINEAR) == [first]

    assert cli.main(["rollback", LINEAR]) == 0
    assert str(client.get_model_version_by_alias(LINEAR, "champion").version) == first
    assert cli.history(client, LINEAR) == []
    assert cli.main(["rollback", LINEAR]) == 2
    assert "no earlier version" in capsys.readouterr().err

    assert cli.main(["list", "--json", LINEAR]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["version"]: r["aliases"] for r in rows}[first] == ["champion"]


def test_a_typo_in_one_target_moves_nothing(second_linear, restore_aliases, capsys):
    client = get_client()
    before = str(client.get_model_version_by_alias(LINEAR, "champion").version)
    code = cli.main(["promote", f"{LINEAR}={second_linear}", "intent-head-mlp=999"])
    assert code == 2
    assert "intent-head-mlp has no version 999" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias(LINEAR, "champion").version) == before
    with pytest.raises(RegistryError, match="invalid alias"):
        cli.promote([(LINEAR, second_linear)], alias="v2")
    assert cli.main(["promote", "no-such-model", "1"]) == 2


# --- serving follows the alias ------------------------------------------------------------------


def fast_polling_config(tmp_path: Path, gateway: dict[str, Any] | None = None) -> Path:
    """The shipped config with the registry polled every second by the gateway and the stages,
    and ``gateway`` merged into the gateway's ``user_config``."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for deployment in config["applications"][0]["deployments"]:
        if "user_config" in deployment and deployment["name"] not in (
            "Ensemble",
            "JobRunner",
            "Monitor",
        ):
            deployment["user_config"]["registry_poll_s"] = 1.0
        if deployment["name"] == "Gateway":
            deployment["user_config"].update(gateway or {})
    path = tmp_path / f"serve_config-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Load:
    """Bounded closed-loop load: ``clients`` callers, until stopped or ``max_requests`` sent."""

    def __init__(self, url: str, clients: int = 4, max_requests: int = 3000) -> None:
        self.url = url
        self.clients = clients
        self.max_requests = max_requests
        self.results: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=60.0) as client:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                try:
                    # Past the response cache: every answer is computed by the release it names
                    # (cache hits would also run through a 3000-request budget in seconds).
                    response = client.post(
                        f"{self.url}/v1/predict",
                        json={"texts": TEXTS},
                        headers={"Cache-Control": "no-cache"},
                    )
                    item = (response.status_code, response.json())
                except (httpx.HTTPError, ValueError) as e:  # ValueError: a body that is not JSON
                    item = (0, {"error": repr(e)})
                with self._lock:
                    self.results.append(item)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for(self, more: int, timeout_s: float = 60.0) -> None:
        """Until ``more`` answers beyond those seen now have come back."""
        wanted = self.count() + more
        deadline = time.monotonic() + timeout_s
        while self.count() < wanted:
            if self.count() >= self.max_requests or time.monotonic() > deadline:
                raise AssertionError(f"the load stopped at {self.count()} answers, {wanted} wanted")
            time.sleep(0.1)


def release_of(body: dict[str, Any]) -> frozenset[tuple[str, str, str]]:
    return frozenset((m["stage"], m["name"], m["version"]) for m in body["models"])


def wait_for_release(url: str, version: str, timeout_s: float = 90.0) -> dict[str, Any]:
    """``/v1/models`` once the gateway serves ``version`` of the linear head."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/v1/models", timeout=10).json()
        if f"{LINEAR}/{version}" in body["release"].split(","):
            return body
        time.sleep(0.25)
    raise AssertionError(f"the gateway never switched to {LINEAR}/{version}: {body}")


@pytest.fixture(scope="module")
def fast_app(shipped_app, tmp_path_factory) -> str:
    """The shared shipped app with one-second registry polls, for this module's Serve tests
    (each one re-applies the gateway settings it needs: a live reconfigure, no restart)."""
    return shipped_app(fast_polling_config(tmp_path_factory.mktemp("config")))


@pytest.mark.serve
def test_promote_and_rollback_under_load_fail_nothing_and_never_mix_versions(
    fast_app, second_linear, restore_aliases, tmp_path
):
    url = fast_app
    apply(tmp_path, {})
    swaps_before = httpx.get(f"{url}/v1/models", timeout=10).json()["release_swaps"]
    first = str(get_client().get_model_version_by_alias(LINEAR, "champion").version)
    with Load(url) as load:
        load.wait_for(10)
        cli.promote([(LINEAR, second_linear)])
        promoted = wait_for_release(url, second_linear)
        load.wait_for(20)
        cli.rollback([LINEAR])
        rolled_back = wait_for_release(url, first)
        load.wait_for(20)

    failures = [r for r in load.results if r[0] != 200]
    assert failures == [], failures[:3]
    assert promoted["previous_release"] == rolled_back["release"]
    assert rolled_back["previous_release"] == promoted["release"]
    assert rolled_back["release_swaps"] - swaps_before == 2

    # Every answer names exactly one of the two releases, and answers that name the same release
    # carry the same probabilities (the versions named are the versions that computed them).
    by_release: dict[frozenset[tuple[str, str, str]], list[list[float]]] = {}
    for _, body in load.results:
        probs = [list(p["probabilities"].values()) for p in body["predictions"]]
        by_release.setdefault(release_of(body), []).append(probs)
    linear_versions = {
        version for release in by_release for stage, _, version in release if stage == "LinearHead"
    }
    assert linear_versions == {first, second_linear}
    assert len(by_release) == 2
    for answers in by_release.values():
        for probs in answers:
            np.testing.assert_allclose(probs, answers[0], atol=1e-5, rtol=0)
    old, new = (np.asarray(by_release[r][0]) for r in by_release)
    assert not np.allclose(old, new, atol=1e-3)


def apply(tmp_path: Path, knobs: dict[str, Any]) -> None:
    """Deploy the gateway ``knobs`` (with one-second registry polls) and wait until its replica
    applies them."""
    from graphs.deploy import deploy
    from tests.fixtures import await_knobs

    deploy(fast_polling_config(tmp_path, knobs))
    await_knobs("intent", {"registry_poll_s": 1.0, **knobs})


def predict(url: str, texts: list[str], key: str | None = None, **headers: str) -> dict[str, Any]:
    if key is not None:
        headers["X-User-Key"] = key
    response = httpx.post(f"{url}/v1/predict", json={"texts": texts}, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def linear_version(body: dict[str, Any]) -> str:
    return next(m["version"] for m in body["models"] if m["stage"] == "LinearHead")


def experiments(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/experiments", timeout=10).json()


@pytest.mark.serve
def test_ab_split_sticky_counted_live_shadowed_and_cached(
    fast_app, second_linear, restore_aliases, tmp_path
):
    from graphs.deploy import deploy

    url = fast_app
    first = str(get_client().get_model_version_by_alias(LINEAR, "champion").version)
    cli.promote([(LINEAR, second_linear)], alias="challenger")
    split = {
        "variants": [
            {"name": "champion", "alias": "champion", "weight": 50},
            {"name": "challenger", "alias": "challenger", "weight": 50},
        ]
    }
    shadow = {"variant": "challenger", "fraction": 1.0}
    apply(tmp_path, {"experiment": split, "shadow": shadow})
    try:
        # Sticky: a key keeps its variant; each variant runs its own linear head version.
        keys: dict[str, str] = {}
        for i in range(64):
            keys.setdefault(predict(url, TEXTS, f"user-{i}")["variant"], f"user-{i}")
        assert set(keys) == {"champion", "challenger"}
        labels: dict[str, list[str]] = {}
        for variant, key in keys.items():
            answers = [predict(url, TEXTS, key, **{"Cache-Control": "no-cache"}) for _ in range(4)]
            assert {a["variant"] for a in answers} == {variant}
            expected = second_linear if variant == "challenger" else first
            assert {linear_version(a) for a in answers} == {expected}
            labels[variant] = [p["label"] for p in answers[0]["predictions"]]

        report = experiments(url)
        by_name = {v["name"]: v for v in report["variants"]}
        assert by_name["challenger"]["release"].split(",").count(f"{LINEAR}/{second_linear}") == 1
        served = sum(v["requests"] for v in by_name.values())
        assert served >= 64 + 8
        for variant in by_name.values():
            assert variant["requests"] >= 5
            assert sum(variant["labels"].values()) == 2 * variant["requests"]
            assert variant["latency_ms"]["p50"] > 0
        # Champion answers were copied to the challenger off the response path.
        deadline = time.monotonic() + 30
        while experiments(url)["shadow"]["requests"] < 5 and time.monotonic() < deadline:
            time.sleep(0.5)
        shadowed = experiments(url)["shadow"]
        assert shadowed["requests"] >= 5 and shadowed["errors"] == 0
        # Every shadowed request asked for TEXTS: agreement is exactly the share of them on
        # which the two releases answer alike.
        agreeing = [a == b for a, b in zip(labels["champion"], labels["challenger"], strict=True)]
        assert shadowed["agreement"] == pytest.approx(sum(agreeing) / len(agreeing))
        assert shadowed["latency_diff_ms"]["mean"] is not None

        # Weights change live: everything to the challenger, no restart.
        split["variants"][0]["weight"] = 0
        apply(tmp_path, {"experiment": split})
        assert {predict(url, TEXTS, f"user-{i}")["variant"] for i in range(20)} == {"challenger"}
        # A new split counts from zero (the traffic above was served under the 50/50 one).
        counted = {v["name"]: v["requests"] for v in experiments(url)["variants"]}
        assert counted == {"champion": 0, "challenger": 20}

        # A shadow that fails never touches the answers: a variant whose linear head cannot load.
        (tmp_path / "no-model").mkdir()
        broken = get_client().create_model_version(LINEAR, source=str(tmp_path / "no-model"))
        cli.promote([(LINEAR, str(broken.version))], alias="broken")
        split = {
            "variants": [
                {"name": "champion", "alias": "champion", "weight": 1},
                {"name": "broken", "alias": "broken", "weight": 0},
            ]
        }
        before = experiments(url)["shadow"]
        failing = {"variant": "broken", "fraction": 1.0}
        apply(tmp_path, {"experiment": split, "shadow": failing})
        answers = [predict(url, [f"where is order {i}?"], f"s{i}") for i in range(10)]
        assert {a["variant"] for a in answers} == {"champion"}
        assert all(not a["degraded"] for a in answers)
        deadline = time.monotonic() + 30
        while experiments(url)["shadow"]["errors"] <= before["errors"]:
            assert time.monotonic() < deadline, "the failing shadow calls were never counted"
            time.sleep(0.5)

        # The cache: a repeat is a hit with the same answer; no-cache recomputes the same answer.
        text = ["my parcel arrived   damaged, can I get a refund?"]
        fresh = predict(url, text, "cache-user")
        again = predict(url, [" my parcel arrived damaged, can I get a refund? "], "cache-user")
        recomputed = predict(url, text, "cache-user", **{"Cache-Control": "no-cache"})
        assert (fresh["cached"], again["cached"], recomputed["cached"]) == (0, 1, 0)
        assert again["predictions"] == fresh["predictions"]  # the very answer, from the cache
        for a, b in zip(recomputed["predictions"], fresh["predictions"], strict=True):
            assert a["label"] == b["label"]
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
        assert again["models"] == fresh["models"]
        cache = experiments(url)["cache"]
        assert cache["hits"] >= 1 and cache["bypassed"] >= 1 and cache["entries"] >= 1
    finally:
        deploy(fast_polling_config(tmp_path))  # back to the plain champion-only gateway
        for version in get_client().search_model_versions(f"name='{LINEAR}'"):
            if str(version.source).endswith("no-model"):
                get_client().delete_model_version(LINEAR, version.version)
