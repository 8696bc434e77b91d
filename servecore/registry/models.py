"""``python -m servecore.registry.models list|promote|rollback``: move model aliases in the
registry.

Serving follows aliases (see :mod:`servecore.traffic.releases`): promoting a version is an alias
move, and a running application picks it up within its poll interval without a restart. Every move
through this command is remembered per alias in a tag of the registered model
(``alias_history.<alias>``, the versions the alias pointed to before, newest last), so ``rollback``
knows where to go back to without the operator looking it up, and rolling back twice goes back two
steps.

Examples::

    python -m servecore.registry.models list
    python -m servecore.registry.models promote intent-head-linear 2             # alias champion
    python -m servecore.registry.models promote intent-encoder=2 intent-head-linear=3  # one release
    python -m servecore.registry.models promote intent-head-mlp 4 --alias challenger
    python -m servecore.registry.models rollback intent-head-linear
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servecore.api.schemas import ALIAS_PATTERN
from servecore.errors import RegistryError
from servecore.registry.client import get_client, registry_failure

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"
HISTORY_TAG = "alias_history.{alias}"
HISTORY_LIMIT = 50
_ALIAS = re.compile(ALIAS_PATTERN)


@dataclass(frozen=True)
class Move:
    """One alias move: ``name@alias`` from ``previous`` (None: the alias was new) to ``version``."""

    name: str
    alias: str
    previous: str | None
    version: str

    def __str__(self) -> str:
        was = "unset" if self.previous is None else f"version {self.previous}"
        return f"{self.name}@{self.alias}: {was} -> version {self.version}"


def _check_alias(alias: str) -> str:
    if not _ALIAS.match(alias) or re.fullmatch(r"[vV]\d+", alias) or alias == "latest":
        raise RegistryError(
            f"invalid alias {alias!r}: letters, digits, '_' or '-', and not v<N> or latest"
        )
    return alias


def _current(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        model = client.get_registered_model(name)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(
            e, f"cannot read registered model {name!r}", f"no registered model {name!r}"
        ) from e
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def history(client: MlflowClient, name: str, alias: str = DEFAULT_ALIAS) -> list[str]:
    """Versions ``name@alias`` pointed to before, oldest first."""
    try:
        tags = client.get_registered_model(name).tags or {}
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(
            e, f"cannot read registered model {name!r}", f"no registered model {name!r}"
        ) from e
    raw = tags.get(HISTORY_TAG.format(alias=alias))
    if not raw:
        return []
    try:
        versions = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s tag on %s", HISTORY_TAG.format(alias=alias), name)
        return []
    return [str(v) for v in versions if isinstance(v, str | int)]


def _set_history(client: MlflowClient, name: str, alias: str, versions: list[str]) -> None:
    try:
        client.set_registered_model_tag(
            name, HISTORY_TAG.format(alias=alias), json.dumps(versions[-HISTORY_LIMIT:])
        )
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, f"cannot record the alias history of {name}") from e


def _move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    try:
        client.set_registered_model_alias(name, alias, version)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, f"cannot point {name}@{alias} at version {version}") from e


def _existing_version(client: MlflowClient, name: str, version: str) -> str:
    if not str(version).isdigit():
        raise RegistryError(f"version must be a number, got {version!r}")
    try:
        return str(client.get_model_version(name, str(version)).version)
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(
            e, f"cannot read {name} version {version}", f"{name} has no version {version}"
        ) from e


def promote(
    targets: Sequence[tuple[str, str]],
    alias: str = DEFAULT_ALIAS,
    client: MlflowClient | None = None,
) -> list[Move]:
    """Point ``alias`` of every ``(name, version)`` at that version, recording where it was.

    Every target is checked before anything moves, so a typo moves nothing. Moving an alias to
    the version it already names is not recorded.
    """
    client = client or get_client()
    _check_alias(alias)
    checked = [(name, _existing_version(client, name, version)) for name, version in targets]
    moves = []
    for name, version in checked:
        previous = _current(client, name, alias)
        if previous == version:
            moves.append(Move(name, alias, previous, version))
            continue
        if previous is not None:
            _set_history(client, name, alias, [*history(client, name, alias), previous])
        _move_alias(client, name, alias, version)
        moves.append(Move(name, alias, previous, version))
    return moves


def rollback(
    names: Sequence[str], alias: str = DEFAULT_ALIAS, client: MlflowClient | None = None
) -> list[Move]:
    """Point ``alias`` of every model back at the version it named before its last move."""
    client = client or get_client()
    _check_alias(alias)
    plans = []
    for name in names:
        past = history(client, name, alias)
        if not past:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
        plans.append((name, past))
    moves = []
    for name, past in plans:
        previous = _current(client, name, alias)
        target = past[-1]
        _move_alias(client, name, alias, target)
        _set_history(client, name, alias, past[:-1])
        moves.append(Move(name, alias, previous, target))
    return moves


def listing(client: MlflowClient | None = None, names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every version of the registered models (or of ``names``), newest first per model."""
    client = client or get_client()
    try:
        models = [client.get_registered_model(n) for n in names] or list(
            client.search_registered_models()
        )
    except Exception as e:  # noqa: BLE001 - sorted into refused / unavailable
        raise registry_failure(e, "cannot list registered models") from e
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{model.name}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(
                {
                    "name": model.name,
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "created": mv.creation_timestamp,
                    "run_id": mv.run_id,
                    "description": mv.description or "",
                }
            )
    return rows


def format_listing(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<24} {'version':>7}  aliases"]
    for row in rows:
        lines.append(f"{row['name']:<24} {row['version']:>7}  {', '.join(row['aliases'])}")
    return "\n".join(lines)


def _targets(items: Sequence[str]) -> list[tuple[str, str]]:
    """``["m", "3"]`` or ``["a=2", "b=3"]`` → ``[(name, version), ...]``."""
    if all("=" in item for item in items):
        return [tuple(item.split("=", 1)) for item in items]  # type: ignore[misc]
    if len(items) == 2 and "=" not in items[0] + items[1]:
        return [(items[0], items[1])]
    raise RegistryError("give NAME VERSION, or NAME=VERSION for one or more models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m servecore.registry.models",
        description="List registered models and move their aliases; serving follows the moves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("list", help="every version, with its aliases")
    show.add_argument("names", nargs="*", help="only these models")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    up = commands.add_parser("promote", help="point an alias at a version (default: champion)")
    up.add_argument("targets", nargs="+", metavar="NAME VERSION | NAME=VERSION ...")
    up.add_argument("--alias", default=DEFAULT_ALIAS)
    back = commands.add_parser("rollback", help="point an alias back at its previous version")
    back.add_argument("names", nargs="+", metavar="NAME")
    back.add_argument("--alias", default=DEFAULT_ALIAS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "list":
            rows = listing(names=args.names)
            print(json.dumps(rows, indent=2) if args.json else format_listing(rows))
            return 0
        if args.command == "promote":
            moves = promote(_targets(args.targets), args.alias)
        else:
            moves = rollback(args.names, args.alias)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for move in moves:
        print(move if move.previous != move.version else f"{move} (unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
