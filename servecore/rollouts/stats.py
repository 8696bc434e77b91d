"""The statistics behind the rollout gates, in the standard library (no scipy at run time).

* :func:`difference_interval` — the Agresti–Caffo interval of a difference of two proportions
  (add one success and one failure to each group, then the Wald interval). Unlike the plain Wald
  interval it behaves with zero events, which is the usual case for errors.
* :func:`binomial_sf` / :func:`binomial_cdf` — exact binomial tails, for the quantile test of the
  latency gate and the agreement test of the shadow gate.
* :func:`merge_samples` — a weighted union of two uniform samples, so that latency samples sent by
  several gateway replicas stay one uniform sample of everything they saw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import NormalDist

_NORMAL = NormalDist()


def z_one_sided(alpha: float) -> float:
    """The standard normal quantile a one-sided test at level ``alpha`` compares against."""
    return _NORMAL.inv_cdf(1.0 - alpha)


def difference_interval(
    x1: int, n1: int, x0: int, n0: int, alpha: float
) -> tuple[float, float, float]:
    """Estimate and one-sided bounds of ``p1 - p0`` (events ``x`` of ``n`` trials per group):
    ``(difference, lower, upper)``; each bound holds with confidence ``1 - alpha``."""
    p1 = (x1 + 1) / (n1 + 2)
    p0 = (x0 + 1) / (n0 + 2)
    diff = p1 - p0
    se = math.sqrt(p1 * (1 - p1) / (n1 + 2) + p0 * (1 - p0) / (n0 + 2))
    z = z_one_sided(alpha)
    return diff, diff - z * se, diff + z * se


def _log_pmf(i: int, n: int, p: float) -> float:
    return (
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return min(1.0, math.fsum(math.exp(_log_pmf(i, n, p)) for i in range(k, n + 1)))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``."""
    return 1.0 - binomial_sf(k + 1, n, p) if k < n else 1.0


def quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def merge_samples(
    old: list[float], old_seen: int, new: list[float], new_seen: int, cap: int, rng: random.Random
) -> list[float]:
    """One uniform sample (at most ``cap``) of the union of two uniform samples that stand for
    ``old_seen`` and ``new_seen`` values: each side keeps a share of the room in proportion to
    what it stands for."""
    if len(old) + len(new) <= cap:
        return old + new
    total = old_seen + new_seen
    keep_old = min(len(old), round(cap * old_seen / total)) if total else 0
    keep_new = min(len(new), cap - keep_old)
    keep_old = min(len(old), cap - keep_new)
    return rng.sample(old, keep_old) + rng.sample(new, keep_new)
