"""Releases: the exact model versions one pipeline request runs on, resolved from aliases as a unit.

A pipeline spec names its models by alias (``models:/intent-head-linear@champion``). An alias can
move at any moment, and the models of one pipeline depend on each other (heads are trained on one
encoder's embeddings), so stages must never each follow an alias on their own: a request could
then meet encoder version 2 and a head trained for version 1. Instead the gateway resolves every
alias of the spec together into a :class:`Release` (alias URI → pinned ``models:/name/version``)
and sends the pinned URI with each stage call. A stage keeps a few versions loaded and computes
with exactly the pinned one, so every answer comes from one release and names it.

The gateway's registry watcher moves to a new release: it polls the registry, waits until two
polls agree (an operator moving several aliases is seen once, complete), warms the new release
through the whole graph, and only then makes it current. Until then the old release keeps
answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from servecore.registry.client import ModelRef, parse_model_uri, resolve

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from servecore.pipeline.spec import StagePlan


def pinned_uri(ref: ModelRef) -> str:
    """``models:/name/version`` of a resolved reference."""
    return f"models:/{ref.name}/{ref.version}"


class StagedSpec(Protocol):
    """An application's spec: the intent pipeline's or a generic model's."""

    def stage_plans(self) -> list[StagePlan]: ...


def spec_model_uris(spec: StagedSpec) -> list[str]:
    """Every registry URI of the spec's stages, each once, in stage order."""
    found: list[str] = []
    for plan in spec.stage_plans():
        uri = plan.init_kwargs.get("model_uri")
        if isinstance(uri, str) and uri not in found:
            found.append(uri)
    return found


@dataclass(frozen=True)
class Release:
    """Alias URI → the registered version it named when the release was resolved."""

    refs: tuple[ModelRef, ...]

    @classmethod
    def resolve_variant(
        cls,
        uris: Iterable[str],
        alias: str,
        client: MlflowClient | None = None,
        keep: Collection[str] = (),
    ) -> Release:
        """The release of an A/B variant: every model at ``alias`` where it has that alias, the
        spec's own reference where it does not (a challenger usually replaces one model).

        URIs in ``keep`` always resolve as written: a fallback model (``@previous``) must not
        follow the primary's variant or rollout to the very version it stands in for."""
        from servecore.errors import RegistryError, RegistryUnavailable
        from servecore.registry.client import get_client

        client = client or get_client()
        refs = []
        for uri in uris:
            name, own_alias, _ = parse_model_uri(uri)
            ref = None
            if own_alias is not None and own_alias != alias and uri not in keep:
                try:
                    ref = replace(resolve(f"models:/{name}@{alias}", client), uri=uri)
                except RegistryUnavailable:
                    raise  # an unanswered question is not a "no"
                except RegistryError:
                    ref = None  # no such alias on this model: it keeps the spec's version
            refs.append(ref or resolve(uri, client))
        return cls(tuple(refs))

    def pin(self, uri: str | None) -> str | None:
        """The pinned URI for a stage asking for ``uri`` (None: the stage has no model)."""
        if uri is None:
            return None
        for ref in self.refs:
            if ref.uri == uri:
                return pinned_uri(ref)
        _, alias, _ = parse_model_uri(uri)
        if alias is None:
            return uri  # already pinned in the spec
        raise KeyError(f"{uri} is not part of this release")

    @property
    def key(self) -> str:
        """A short stable name: ``intent-encoder/2,intent-head-linear/3,...``."""
        return ",".join(f"{ref.name}/{ref.version}" for ref in self.refs)

    def same_versions(self, other: Release | None) -> bool:
        return other is not None and self.key == other.key


IDLE_RECHECK_S = 5.0
"""How often a turned-off poller (interval 0) looks whether it was turned back on."""


async def poll_ticks(interval_s: Callable[[], float]) -> AsyncIterator[None]:
    """Yield once per ``interval_s()`` seconds (read anew each time, so a live config change
    applies at the next tick); while it is 0, polling is off and nothing is yielded."""
    while True:
        interval = interval_s()
        await asyncio.sleep(interval if interval > 0 else IDLE_RECHECK_S)
        if interval > 0:
            yield
