"""The bootstrap and the registry client, against a real (temporary, sqlite) MLflow store."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from servecore import LABELS
from servecore.errors import RegistryError, RegistryUnavailable
from servecore.registry.client import fetch, get_client, parse_model_uri, resolve
from training import bootstrap

RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\([\w:.-]+ pid=\d+")
"""A log line Ray forwards from a worker process to the driver's stderr."""

MEMBERS = ("linear", "mlp", "bow")


def test_every_shipped_model_is_registered_with_signature_and_metrics(registry):
    import mlflow

    client = get_client()
    for name in bootstrap.SHIPPED:
        version = client.get_model_version_by_alias(name, "champion")
        assert str(version.version) == "1"
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        assert info.signature is not None and info.signature.inputs is not None
        if name != bootstrap.ENCODER:
            metrics = client.get_run(version.run_id).data.metrics
            assert set(metrics) >= {"test_accuracy", "test_macro_f1"}


def test_the_ensemble_is_at_least_as_good_as_its_best_member(registry):
    results = registry.results
    assert set(results) == {*MEMBERS, "ensemble"}
    best = max(results[m]["test_macro_f1"] for m in MEMBERS)
    assert results["ensemble"]["test_macro_f1"] >= best
    assert results["ensemble"]["test_accuracy"] > 0.85


def test_a_second_bootstrap_changes_nothing(registry, capsys):
    client = get_client()
    experiment = client.get_experiment_by_name("intent-serving")
    runs_before = len(client.search_runs([experiment.experiment_id]))
    # The drift reference profile (Ray Data) is covered by tests/test_observability.py.
    assert bootstrap.main(["--no-reference"]) == 0
    out = capsys.readouterr().out
    for name in bootstrap.SHIPPED:
        assert f"{name}@champion: already registered" in out
        assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert len(client.search_runs([experiment.experiment_id])) == runs_before
    assert "| ensemble |" in out and "| bow |" in out


def test_registered_models_work_as_plain_pyfuncs(registry):
    import mlflow

    head = mlflow.pyfunc.load_model("models:/intent-head-linear@champion")
    probs = head.predict(np.zeros((2, 384), dtype=np.float32))
    assert probs.shape == (2, len(LABELS))
    bow = mlflow.pyfunc.load_model("models:/intent-bow@champion")
    probs = bow.predict(pd.DataFrame({"text": ["I was charged twice", "reset my password"]}))
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["billing", "account_access"]


def test_resolve_and_fetch(registry):
    ref = resolve("models:/intent-bow@champion")
    assert (ref.name, ref.version, ref.aliases) == ("intent-bow", "1", ("champion",))
    assert resolve("models:/intent-bow/1").version == "1"
    ref, folder = fetch("models:/intent-bow@champion")
    assert (folder / "MLmodel").is_file()


def test_a_variant_moves_every_alias_it_names_but_the_kept_ones(registry, tmp_path):
    """``Release.resolve_variant``: a variant's alias replaces each model's own alias where the
    model has it; a URI in ``keep`` (a fallback) resolves as written."""
    from servecore.traffic.releases import Release

    client = get_client()
    name = "variant-keep-probe"  # registry metadata only: versions without a logged model
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, source=tmp_path.as_uri())
    client.set_registered_model_alias(name, "champion", "3")
    client.set_registered_model_alias(name, "previous", "1")
    client.set_registered_model_alias(name, "candidate", "2")
    primary, fallback = f"models:/{name}@champion", f"models:/{name}@previous"
    uris = [primary, fallback, "models:/intent-bow@champion"]

    def versions(release: Release) -> list[str]:
        return [ref.version for ref in release.refs]

    # Without keep, the fallback follows the variant to the primary's own version.
    assert versions(Release.resolve_variant(uris, "champion")) == ["3", "3", "1"]
    assert versions(Release.resolve_variant(uris, "champion", keep={fallback})) == ["3", "1", "1"]
    kept = Release.resolve_variant(uris, "candidate", keep={fallback})
    assert versions(kept) == ["2", "1", "1"]  # intent-bow has no candidate: its own version
    assert kept.pin(fallback) == f"models:/{name}/1"


def test_bad_references_fail_clearly(registry):
    with pytest.raises(RegistryError, match="unsupported model URI 'runs:/abc/model'"):
        parse_model_uri("runs:/abc/model")
    with pytest.raises(RegistryError, match="cannot resolve 'models:/intent-bow@nope'"):
        resolve("models:/intent-bow@nope")
    with pytest.raises(RegistryError, match="cannot resolve 'models:/missing@champion'"):
        resolve("models:/missing@champion")
    with pytest.raises(RegistryError) as refused:
        resolve("models:/missing/3")
    assert not isinstance(refused.value, RegistryUnavailable)


@pytest.fixture
def unreachable_store(registry, monkeypatch) -> Iterator[str]:
    """The registry URI pointed at a port nothing listens on, with credentials in it."""
    from servecore.settings import get_settings
    from tests.conftest import free_port

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ops:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    get_settings.cache_clear()
    yield f"127.0.0.1:{port}"
    monkeypatch.undo()
    get_settings.cache_clear()


def test_an_unreachable_store_is_unavailable_not_a_refusal_and_named_without_secrets(
    unreachable_store,
):
    from servecore.registry import models

    for call in (
        lambda: resolve("models:/intent-bow@champion"),
        lambda: models.promote([("intent-bow", "1")], "staging"),
        lambda: models.listing(),
    ):
        with pytest.raises(RegistryUnavailable) as failed:
            call()
        message = failed.value.message
        assert f"the model registry at http://{unreachable_store} is unreachable" in message
        assert "s3cret" not in message and "ops:" not in message
        assert failed.value.status_code == 503


def test_the_bootstrap_names_an_unreachable_store_and_exits_2(unreachable_store, capsys):
    assert bootstrap.main(["--no-reference"]) == 2
    # Only the bootstrap's own lines: the session's Ray forwards its workers' log lines
    # ("(HAProxyManager pid=...) ...") to this process's stderr whenever they log.
    err = "".join(
        line
        for line in capsys.readouterr().err.splitlines(keepends=True)
        if not RAY_WORKER_LINE.match(line)
    )
    assert err.startswith("error: the bootstrap failed: the model registry at ")
    assert unreachable_store in err and "s3cret" not in err
