"""Unit tests of tabular input drift (PSI per feature) and the row window (plain pandas, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from servecore.monitoring.tabular_drift import (
    OTHER,
    FeatureProfile,
    ReferenceProfile,
    RowWindow,
    population_stability_index,
)

COLORS = ["red", "green", "blue", "black"]
COLOR_SHARES = [0.4, 0.3, 0.2, 0.1]


def sample(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> pd.DataFrame:
    """Rows of a small tabular model's inputs; ``shift`` moves ``income`` by that many stds."""
    return pd.DataFrame(
        {
            "age": rng.normal(40.0, 10.0, n),
            "income": rng.lognormal(10.0, 0.5, n),
            "score": rng.normal(0.0, 1.0, n) + shift,
            "visits": rng.poisson(3.0, n),
            "color": rng.choice(COLORS, n, p=COLOR_SHARES),
            "member": rng.random(n) < 0.3,
        }
    )


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return ReferenceProfile.from_frame(sample(np.random.default_rng(0), 20_000))


def test_kinds_and_bins(profile: ReferenceProfile) -> None:
    kinds = {f.name: f.kind for f in profile.features}
    assert kinds == {
        "age": "numeric",
        "income": "numeric",
        "score": "numeric",
        "visits": "numeric",
        "color": "categorical",
        "member": "categorical",
    }
    age = profile.features[0]
    assert len(age.edges) == 9 and len(age.shares) == 10
    assert age.edges == sorted(age.edges)
    assert sum(age.shares) == pytest.approx(1.0)
    assert all(s == pytest.approx(0.1, abs=0.01) for s in age.shares)
    assert age.mean == pytest.approx(40.0, abs=0.5) and age.std == pytest.approx(10.0, abs=0.5)
    member = next(f for f in profile.features if f.name == "member")
    assert set(member.categories) == {"True", "False", OTHER}
    assert profile.rows == 20_000


def test_same_distribution_is_stable(profile: ReferenceProfile) -> None:
    report = profile.score(sample(np.random.default_rng(1), 2_000))
    assert report["rows"] == 2_000
    assert report["statistic"] == "psi" and report["threshold"] == 0.2
    assert report["drifted"] == []
    for name, feature in report["features"].items():
        assert feature["psi"] < 0.1, name
        assert feature["drift"] is False
        assert feature["missing_share"] == 0.0 and feature["reference_missing_share"] == 0.0


def test_shifted_numeric_feature_is_flagged(profile: ReferenceProfile) -> None:
    report = profile.score(sample(np.random.default_rng(2), 2_000, shift=1.5))
    assert report["drifted"] == ["score"]
    score = report["features"]["score"]
    assert score["psi"] > 0.2 and score["drift"] is True
    assert score["mean"] == pytest.approx(1.5, abs=0.1)
    assert score["reference_mean"] == pytest.approx(0.0, abs=0.05)
    assert report["features"]["age"]["drift"] is False


def test_changed_category_shares_are_flagged(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(3)
    window = sample(rng, 2_000)
    window["color"] = rng.choice(COLORS, 2_000, p=[0.1, 0.1, 0.2, 0.6])
    report = profile.score(window)
    assert report["drifted"] == ["color"]
    color = report["features"]["color"]
    assert color["kind"] == "categorical" and color["psi"] > 0.2
    top = color["top_categories"]
    assert list(top)[0] == "black" and top["black"] == pytest.approx(0.6, abs=0.05)


def test_unseen_categories_go_to_other(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(4)
    window = sample(rng, 1_000)
    window["color"] = rng.choice(["purple", "teal"], 1_000)
    color = profile.score(window)["features"]["color"]
    assert color["top_categories"] == {OTHER: 1.0}
    assert color["drift"] is True


def test_top_categories_and_other_pooling() -> None:
    rng = np.random.default_rng(5)
    # 30 categories with decreasing frequency: the 20 most frequent are kept.
    names = [f"c{i:02d}" for i in range(30)]
    weights = np.arange(30, 0, -1, dtype=float)
    frame = pd.DataFrame({"cat": rng.choice(names, 30_000, p=weights / weights.sum())})
    profile = ReferenceProfile.from_frame(frame)
    categories = profile.features[0].categories
    assert set(categories) == set(names[:20]) | {OTHER}
    assert sum(categories.values()) == pytest.approx(1.0)
    expected_other = weights[20:].sum() / weights.sum()
    assert categories[OTHER] == pytest.approx(expected_other, abs=0.01)
    # The pooled tail looks the same in a window from the same distribution.
    window = pd.DataFrame({"cat": rng.choice(names, 3_000, p=weights / weights.sum())})
    report = profile.score(window)
    assert report["features"]["cat"]["psi"] < 0.1
    assert len(report["features"]["cat"]["top_categories"]) == 5


def test_missing_values_and_missing_columns(profile: ReferenceProfile) -> None:
    rng = np.random.default_rng(6)
    window = sample(rng, 1_000).drop(columns=["color"])
    window.loc[:249, "age"] = np.nan
    window["member"] = window["member"].astype(object)
    window.loc[:99, "member"] = None
    window["extra"] = 1.0
    report = profile.score(window)
    features = report["features"]
    assert "extra" not in features
    assert features["age"]["missing_share"] == pytest.approx(0.25)
    # Missing values stay out of the bins: the observed ages are still from the reference.
    assert features["age"]["psi"] < 0.1 and features["age"]["drift"] is False
    assert features["member"]["missing_share"] == pytest.approx(0.1)
    assert features["member"]["psi"] < 0.1
    # A column that stops arriving is all missing, and flagged.
    assert features["color"]["missing_share"] == 1.0
    assert features["color"]["top_categories"] == {}
    assert features["color"]["drift"] is True
    assert report["drifted"] == ["color"]


def test_reference_missing_share() -> None:
    frame = pd.DataFrame({"x": [1.0, None, 3.0, 4.0, np.inf], "c": ["a", None, "b", "a", np.nan]})
    profile = ReferenceProfile.from_frame(frame)
    x, c = profile.features
    assert x.missing_share == pytest.approx(0.4)  # None and inf
    assert x.mean == pytest.approx(8.0 / 3.0)
    assert c.missing_share == pytest.approx(0.4)
    assert c.categories == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3), OTHER: 0.0}
    report = profile.score(pd.DataFrame({"x": [None, 2.0], "c": ["a", "b"]}))
    assert report["features"]["x"]["reference_missing_share"] == pytest.approx(0.4)
    assert report["features"]["x"]["missing_share"] == 0.5


def test_round_trip_through_json_gives_identical_scores(profile: ReferenceProfile) -> None:
    text = json.dumps(profile.to_dict())
    restored = ReferenceProfile.from_dict(json.loads(text))
    assert restored == profile
    window = sample(np.random.default_rng(7), 1_500, shift=1.5)
    window.loc[:10, "color"] = None
    assert restored.score(window) == profile.score(window)
    json.dumps(profile.score(window))  # the report is JSON-serialisable too


def test_constant_column() -> None:
    frame = pd.DataFrame({"k": [5.0] * 200, "c": ["x"] * 200})
    profile = ReferenceProfile.from_frame(frame)
    k = profile.features[0]
    assert k.edges == [] and k.shares == [1.0] and k.std == 0.0
    same = profile.score(pd.DataFrame({"k": [5.0] * 50, "c": ["x"] * 50}))
    assert same["drifted"] == [] and same["features"]["k"]["psi"] == 0.0
    # One bin: a constant column only drifts through its missing share, never through its values.
    other = profile.score(pd.DataFrame({"k": [7.0] * 50, "c": ["x"] * 50}))
    assert other["features"]["k"]["psi"] == 0.0


def test_explicit_kinds() -> None:
    rng = np.random.default_rng(8)
    frame = pd.DataFrame({"code": rng.integers(0, 5, 1_000), "level": rng.integers(0, 3, 1_000)})
    profile = ReferenceProfile.from_frame(frame, kinds={"code": "categorical"}, bins=4)
    code, level = profile.features
    assert code.kind == "categorical" and set(code.categories) == {"0", "1", "2", "3", "4", OTHER}
    assert level.kind == "numeric" and len(level.shares) <= 4
    # An integer column that picked up a NaN turns float; 3.0 is still category "3".
    window = pd.DataFrame({"code": [3.0, np.nan, 3.0, 1.0], "level": [0, 1, 2, 1]})
    top = profile.score(window)["features"]["code"]["top_categories"]
    assert top == {"3": pytest.approx(2 / 3), "1": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="not in the frame"):
        ReferenceProfile.from_frame(frame, kinds={"nope": "numeric"})
    with pytest.raises(ValueError, match="kind must be"):
        ReferenceProfile.from_frame(frame, kinds={"code": "ordinal"})  # type: ignore[dict-item]


def test_empty_inputs_are_rejected(profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="no rows"):
        ReferenceProfile.from_frame(pd.DataFrame({"x": []}))
    with pytest.raises(ValueError, match="empty window"):
        profile.score(pd.DataFrame())


def test_psi_is_finite_with_empty_bins() -> None:
    assert population_stability_index(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    value = population_stability_index(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert np.isfinite(value) and value > 10


def test_feature_profile_round_trip() -> None:
    feature = FeatureProfile("x", "numeric", 0.0, edges=[1.0], shares=[0.5, 0.5], mean=1.0, std=1.0)
    assert FeatureProfile.from_dict(json.loads(json.dumps(feature.to_dict()))) == feature


def test_row_window_keeps_last_rows() -> None:
    window = RowWindow(3)
    assert len(window) == 0 and window.frame().empty
    window.extend([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    window.extend([{"a": 3}, {"a": 4, "b": "z"}])
    assert len(window) == 3
    frame = window.frame()
    assert frame["a"].tolist() == [2, 3, 4]
    assert frame["b"].isna().tolist() == [False, True, False]
    rows = [{"a": 5}]
    window.extend(rows)
    rows[0]["a"] = 99  # the window holds copies
    assert window.frame()["a"].tolist() == [3, 4, 5]
    window.clear()
    assert len(window) == 0
    with pytest.raises(ValueError):
        RowWindow(0)


def test_row_window_feeds_score(profile: ReferenceProfile) -> None:
    window = RowWindow(500)
    rows = sample(np.random.default_rng(9), 800).to_dict(orient="records")
    window.extend(rows)
    report = profile.score(window.frame())
    assert report["rows"] == 500 and report["drifted"] == []
