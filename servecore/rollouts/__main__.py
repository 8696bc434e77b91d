"""``python -m servecore.rollouts``: start, watch and steer rollouts without the HTTP API (same
store, same registry, same decisions as ``/v1/rollouts``).

Examples::

    python -m servecore.rollouts start --app intent intent-head-linear=5 intent-head-mlp=5
    python -m servecore.rollouts start --app intent intent-head-linear=5 \\
        --steps 0:0.5,5:0.2,25,50,100 --min-duration 120 --min-requests 500
    python -m servecore.rollouts list --app intent
    python -m servecore.rollouts show ID
    python -m servecore.rollouts pause|resume|advance|abort ID --reason "..."
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from servecore.rollouts import control
from servecore.rollouts.model import RolloutPlan, Step


def parse_steps(text: str, min_duration_s: float, min_requests: int) -> list[Step]:
    """``0:0.5,5:0.2,25,50,100`` → steps of ``traffic[:shadow]``."""
    steps = []
    for part in text.split(","):
        traffic, _, shadow = part.strip().partition(":")
        steps.append(
            Step(
                traffic=float(traffic),
                shadow=float(shadow or 0),
                min_duration_s=min_duration_s,
                min_requests=min_requests,
            )
        )
    return steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m servecore.rollouts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a rollout of registered versions")
    start.add_argument("--app", default="intent")
    start.add_argument("candidate", nargs="+", metavar="NAME=VERSION")
    start.add_argument("--steps", default="0:0.5,5:0.2,25:0.1,50,100")
    start.add_argument("--min-duration", type=float, default=60.0, help="seconds per step")
    start.add_argument("--min-requests", type=int, default=200, help="per variant per step")
    start.add_argument("--gates", default="{}", help="JSON of gate settings (README)")
    start.add_argument("--note", default="")
    listing = sub.add_parser("list", help="rollouts, newest first")
    listing.add_argument("--app", default=None)
    show = sub.add_parser("show", help="one rollout: step, gates with evidence, history")
    show.add_argument("id")
    for action in ("pause", "resume", "advance", "abort"):
        steer = sub.add_parser(action, help=f"{action} a running rollout by hand")
        steer.add_argument("id")
        steer.add_argument("--reason", default="")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = control.get_store()
    try:
        if args.command == "start":
            candidate = dict(item.split("=", 1) for item in args.candidate)
            plan = RolloutPlan(
                app=args.app,
                candidate=candidate,
                steps=parse_steps(args.steps, args.min_duration, args.min_requests),
                gates=json.loads(args.gates),
                note=args.note,
            )
            print(json.dumps(control.start_rollout(store, plan, "cli").view(), indent=2))
        elif args.command == "list":
            for rollout in store.recent(args.app):
                traffic = rollout.traffic()
                print(
                    f"{rollout.id}  {rollout.app:<16} {rollout.status:<12} step {rollout.step}"
                    f"  candidate {rollout.plan.candidate}"
                    f"  traffic {'-' if traffic is None else f'{traffic[0]:g}%'}"
                )
        elif args.command == "show":
            found = store.get(args.id)
            if found is None:
                print(f"no rollout {args.id!r}", file=sys.stderr)
                return 1
            print(json.dumps(found.view(), indent=2))
        else:
            rollout = control.act(store, args.id, args.command, "cli", args.reason)
            print(json.dumps(rollout.view(), indent=2))
    except (ValueError, KeyError, control.RolloutConflict) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the registry's refusals and outages, worded
        from servecore.registry.client import registry_failure

        print(f"error: {registry_failure(e, 'the registry call failed').message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
