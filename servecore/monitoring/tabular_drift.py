"""Input drift of tabular models: how far a window of served rows has moved, feature by feature,
from a reference profile of the data the model was trained on. Plain pandas and numpy, no Ray or
MLflow, so that the profile can be computed wherever the training data is and stored as JSON.

Every feature is scored with the Population Stability Index,

    PSI = sum over bins of (w - r) * ln(w / r),

where ``r`` is the reference share of a bin and ``w`` the window's share:

numeric features
    Bins are the reference's quantiles (10 by default, duplicates merged, so a constant column has
    one bin); the outer bins are open-ended, so values beyond the reference range still land in
    a bin. The report also gives the window and reference means.
categorical features
    Values are compared as strings. The 20 most frequent reference categories are kept, the rest
    pooled as ``"__other__"``; window categories unseen in the reference go to ``"__other__"``.
    The report also gives the window's five largest category shares.

Missing values (``None``, NaN, and for numeric features anything non-finite or not a number) are
left out of the bins and reported as ``missing_share`` next to the reference's; a profile column
absent from the window counts as all missing. A feature with no observed values in the window
scores as if every bin had emptied (a large PSI), so a column that stops arriving is flagged.

A feature drifts when its PSI exceeds the threshold, 0.2 by default, the common rule of thumb:
below 0.1 the distribution is stable, 0.1-0.2 is a moderate shift, above 0.2 a significant one.
PSI grows with noise in small windows, so score windows of a few hundred rows or more.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np
import pandas as pd

FeatureKind = Literal["numeric", "categorical"]

OTHER = "__other__"
"""Category that pools reference categories beyond the top ones and window categories unseen in
the reference (a real category of that name is pooled with them)."""
TOP_CATEGORIES = 20
"""Reference categories kept per categorical feature."""
REPORTED_CATEGORIES = 5
"""Window category shares reported per categorical feature."""
EPSILON = 1e-4
"""Floor on bin shares in PSI: an empty bin would otherwise give ln(0) and an infinite PSI. Small
enough that a bin emptying or appearing still weighs heavily (about ln(r / 1e-4) per unit share)."""
DEFAULT_THRESHOLD = 0.2
"""PSI above which a feature counts as drifted (rule of thumb: > 0.2 is a significant shift)."""
PROFILE_VERSION = 1


@dataclass
class FeatureProfile:
    """The reference distribution of one feature.

    Numeric features use ``edges``, ``shares``, ``mean`` and ``std``; categorical ones use
    ``categories``. Shares are over observed (non-missing) values and sum to 1 when the reference
    had any.
    """

    name: str
    kind: FeatureKind
    missing_share: float
    edges: list[float] = field(default_factory=list)
    """Interior bin edges, ascending: bin i holds ``edges[i-1] <= x < edges[i]``, the first and
    last bins are open-ended (``len(edges) + 1`` bins)."""
    shares: list[float] = field(default_factory=list)
    """Reference share of each numeric bin."""
    mean: float | None = None
    std: float | None = None
    """Population standard deviation of the observed reference values."""
    categories: dict[str, float] = field(default_factory=dict)
    """Reference share of each kept category and of :data:`OTHER`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; only the fields of the feature's kind."""
        data: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "missing_share": self.missing_share,
        }
        if self.kind == "numeric":
            data.update(edges=self.edges, shares=self.shares, mean=self.mean, std=self.std)
        else:
            data["categories"] = self.categories
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureProfile:
        """Inverse of :meth:`to_dict`."""
        kind = _check_kind(data["kind"], data["name"])
        return cls(
            name=str(data["name"]),
            kind=kind,
            missing_share=float(data["missing_share"]),
            edges=[float(e) for e in data.get("edges", [])],
            shares=[float(s) for s in data.get("shares", [])],
            mean=_optional_float(data.get("mean")),
            std=_optional_float(data.get("std")),
            categories={str(k): float(v) for k, v in data.get("categories", {}).items()},
        )


@dataclass
class ReferenceProfile:
    """Per-feature reference distributions of a model's training inputs."""

    features: list[FeatureProfile]
    rows: int

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        kinds: dict[str, FeatureKind] | None = None,
        bins: int = 10,
    ) -> ReferenceProfile:
        """Profile every column of ``frame`` (the reference data, e.g. the training set).

        ``kinds`` overrides the kind of the columns it names; the others are numeric when their
        dtype is numeric (bool excluded) and categorical otherwise. ``bins`` is the number of
        quantile bins of numeric features before duplicate edges are merged.
        """
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        if len(frame) == 0:
            raise ValueError("the reference frame has no rows")
        kinds = dict(kinds or {})
        columns = {str(c): c for c in frame.columns}
        unknown = sorted(set(kinds) - set(columns))
        if unknown:
            raise ValueError(f"kinds names columns {unknown} that are not in the frame")
        features = []
        for name, column in columns.items():
            series = frame[column]
            kind = _check_kind(kinds[name], name) if name in kinds else _default_kind(series)
            if kind == "numeric":
                features.append(_numeric_profile(name, series, bins))
            else:
                features.append(_categorical_profile(name, series))
        return cls(features=features, rows=len(frame))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (plain floats, lists, dicts and strings)."""
        return {
            "version": PROFILE_VERSION,
            "rows": self.rows,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceProfile:
        """Inverse of :meth:`to_dict`."""
        version = data.get("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise ValueError(f"unsupported reference profile version {version}")
        return cls(
            features=[FeatureProfile.from_dict(f) for f in data["features"]],
            rows=int(data["rows"]),
        )

    def score(self, window: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
        """PSI of every profiled feature in ``window`` against the reference.

        Returns ``{"rows", "statistic": "psi", "threshold", "drifted": [names], "features":
        {name: {"kind", "psi", "drift", "missing_share", "reference_missing_share", ...}}}`` with
        ``mean`` and ``reference_mean`` for numeric features and ``top_categories`` (window shares,
        largest first, at most five) for categorical ones. Window columns not in the profile are
        ignored; profile columns missing from the window count as all missing.
        """
        rows = len(window)
        if rows == 0:
            # Nothing to judge: an empty window would otherwise look like every feature vanished.
            raise ValueError("cannot score an empty window")
        columns = {str(c): c for c in window.columns}
        features: dict[str, dict[str, Any]] = {}
        drifted: list[str] = []
        for profile in self.features:
            if profile.name in columns:
                series = window[columns[profile.name]]
            else:
                series = pd.Series([None] * rows, index=window.index, dtype=object)
            if profile.kind == "numeric":
                report = _score_numeric(profile, series)
            else:
                report = _score_categorical(profile, series)
            report["drift"] = bool(report["psi"] > threshold)
            if report["drift"]:
                drifted.append(profile.name)
            features[profile.name] = report
        return {
            "rows": rows,
            "statistic": "psi",
            "threshold": threshold,
            "drifted": drifted,
            "features": features,
        }


class RowWindow:
    """The most recent ``size`` served rows (dicts of feature values), oldest dropped first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.size = size
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Append rows, dropping the oldest beyond ``size``."""
        # Copies, so that a caller reusing its dicts does not rewrite the window.
        self._rows.extend(dict(row) for row in rows)

    def __len__(self) -> int:
        return len(self._rows)

    def frame(self) -> pd.DataFrame:
        """The rows as a frame, oldest first; keys absent from a row are missing values."""
        return pd.DataFrame.from_records(list(self._rows))

    def clear(self) -> None:
        """Drop every row."""
        self._rows.clear()


def population_stability_index(window: np.ndarray, reference: np.ndarray) -> float:
    """PSI of two share vectors over the same bins, shares floored at :data:`EPSILON`."""
    w = np.maximum(np.asarray(window, dtype=np.float64), EPSILON)
    r = np.maximum(np.asarray(reference, dtype=np.float64), EPSILON)
    return float(np.sum((w - r) * np.log(w / r)))


def _check_kind(kind: Any, name: str) -> FeatureKind:
    if kind not in get_args(FeatureKind):
        raise ValueError(f"feature {name!r}: kind must be numeric or categorical, got {kind!r}")
    return cast(FeatureKind, kind)


def _default_kind(series: pd.Series) -> FeatureKind:
    # Bools are numeric to pandas, but True/False are categories, not magnitudes.
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return "categorical"
    return "numeric"


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _numeric_values(series: pd.Series) -> np.ndarray:
    """All values as floats, NaN where missing, not a number, or infinite."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    # Infinities would break quantile interpolation; they are treated like missing values. (A new
    # array: pandas may hand out a read-only view of the frame's data.)
    return np.where(np.isfinite(values), values, np.nan)


def _bin_shares(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Share of observed ``values`` in each bin (zeros when there are none)."""
    counts = np.bincount(
        np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right"),
        minlength=len(edges) + 1,
    ).astype(np.float64)
    return counts / len(values) if len(values) else counts


def _numeric_profile(name: str, series: pd.Series, bins: int) -> FeatureProfile:
    values = _numeric_values(series)
    observed = values[~np.isnan(values)]
    missing_share = (len(values) - len(observed)) / len(values)
    if len(observed) == 0:
        return FeatureProfile(name, "numeric", missing_share, edges=[], shares=[0.0])
    quantiles = np.quantile(observed, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    # An edge at the minimum would only separate an empty bin of smaller values, which the
    # open-ended first bin already covers; dropping it gives a constant column a single bin.
    edges = [float(e) for e in np.unique(quantiles) if e > observed.min()]
    return FeatureProfile(
        name,
        "numeric",
        missing_share,
        edges=edges,
        shares=[float(s) for s in _bin_shares(observed, edges)],
        mean=float(observed.mean()),
        std=float(observed.std()),
    )


def _category(value: Any) -> str:
    """The string a categorical value is compared as."""
    # Integer columns turn float once they hold a NaN; 3.0 and 3 must stay the same category.
    if (
        isinstance(value, float | np.floating)
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        return str(int(value))
    if isinstance(value, np.bool_):
        return str(bool(value))
    return str(value)


def _category_counts(series: pd.Series) -> tuple[collections.Counter[str], int]:
    """Counts of the observed values as strings, and the number of missing values."""
    missing = series.isna()
    # Count raw values first so that the string conversion runs once per distinct value.
    raw = series[~missing].value_counts(dropna=True)
    counts: collections.Counter[str] = collections.Counter()
    for value, count in raw.items():
        counts[_category(value)] += int(count)
    return counts, int(missing.sum())


def _categorical_profile(name: str, series: pd.Series) -> FeatureProfile:
    counts, missing = _category_counts(series)
    observed = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:TOP_CATEGORIES])
    kept.pop(OTHER, None)
    other = observed - sum(kept.values())
    categories = {c: n / observed for c, n in kept.items()} if observed else {}
    categories[OTHER] = other / observed if observed else 0.0
    return FeatureProfile(name, "categorical", missing / len(series), categories=categories)


def _score_numeric(profile: FeatureProfile, series: pd.Series) -> dict[str, Any]:
    values = _numeric_values(series)
    observed = values[~np.isnan(values)]
    shares = _bin_shares(observed, profile.edges)
    return {
        "kind": "numeric",
        "psi": population_stability_index(shares, np.asarray(profile.shares)),
        "missing_share": (len(values) - len(observed)) / len(values),
        "reference_missing_share": profile.missing_share,
        "mean": float(observed.mean()) if len(observed) else None,
        "reference_mean": profile.mean,
    }


def _score_categorical(profile: FeatureProfile, series: pd.Series) -> dict[str, Any]:
    counts, missing = _category_counts(series)
    observed = sum(counts.values())
    pooled: collections.Counter[str] = collections.Counter()
    for category, count in counts.items():
        pooled[category if category in profile.categories else OTHER] += count
    names = list(profile.categories)
    window_shares = np.asarray([pooled[c] / observed if observed else 0.0 for c in names])
    reference_shares = np.asarray([profile.categories[c] for c in names])
    top = sorted(pooled.items(), key=lambda item: (-item[1], item[0]))[:REPORTED_CATEGORIES]
    return {
        "kind": "categorical",
        "psi": population_stability_index(window_shares, reference_shares),
        "missing_share": missing / len(series),
        "reference_missing_share": profile.missing_share,
        "top_categories": {c: n / observed for c, n in top if n > 0},
    }
