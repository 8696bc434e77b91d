"""``python -m edge``: export the served release to ONNX, gate and register it, and write the
bundle a device runs.

* ``export`` — every variant (``fp32``, ``int8``, ``shrunk``) scored on the test split through
  its own bundle; those within the gate registered as ``intent-edge`` versions, ``edge`` on the
  one to ship (``--ship``, default ``int8``). Exit status 2 when that one is refused.
* ``bench`` — size, load time, latency and throughput of every variant in process, and the
  int8 profile served next to the torch one (README's edge table).
* ``bundle`` — the registered bundle behind ``@edge`` (or ``--version``) as a folder, and with
  ``--archive DIR`` its ``.tar.gz`` and the ``latest.json`` channel manifest to serve devices.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from edge.release import EDGE_ALIAS, EDGE_MODEL, VARIANTS, GateRefused, build

ROOT = Path(__file__).resolve().parents[1]


def _table(report: dict) -> str:
    lines = [
        "| variant | accuracy | macro-F1 | drop (points) | agreement | max abs dp | ONNX MB "
        "| gate |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| torch fp32 (served) | {report['torch']['test_accuracy']:.4f} | "
        f"{report['torch']['test_macro_f1']:.4f} | – | 1 | 0 | – | – |",
    ]
    for name, v in report["variants"].items():
        lines.append(
            f"| {name} | {v['test_accuracy']:.4f} | {v['test_macro_f1']:.4f} | "
            f"{100 * v['macro_f1_drop']:.2f} | {v['agreement']:.4f} | "
            f"{v['max_probability_difference']:.4f} | {v['onnx_bytes'] / 2**20:.1f} | {v['gate']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export, gate and register")
    export.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    export.add_argument("--app", default="intent")
    export.add_argument("--variants", default="fp32,int8,shrunk")
    export.add_argument("--ship", default="int8", help="the variant that gets @edge")
    export.add_argument("--output", default=str(ROOT / ".edge"))
    bundle = commands.add_parser("bundle", help="the registered bundle, for devices")
    bundle.add_argument("--version", help="an intent-edge version (default: @edge)")
    bundle.add_argument("--output", default=str(ROOT / "edge-bundle"))
    bundle.add_argument("--archive", help="also write the .tar.gz and latest.json here")
    bench = commands.add_parser("bench", help="the variants in process, and served")
    bench.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    bench.add_argument("--export", default=str(ROOT / ".edge"), help="export's output folder")
    bench.add_argument("--no-served", action="store_true", help="in process only")
    bench.add_argument("--output", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "export":
        from servecore.config_check import load_app_spec

        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
        spec = load_app_spec(args.config, args.app)
        try:
            report = build(spec, Path(args.output), [VARIANTS[n] for n in names], args.ship)
        except GateRefused as e:
            print(f"refused: {e}", file=sys.stderr)
            return 2
        print(_table(report))
        print(json.dumps({"registered": report["registered"], "alias": EDGE_ALIAS}))
        return 0

    if args.command == "bench":
        from edge.benchmark import run, tables
        from servecore.config_check import load_app_spec

        spec = load_app_spec(args.config, "intent")
        results = run(Path(args.export), spec, not args.no_served, Path(args.output))
        print(tables(results))
        return 0

    from edge.bundle import archive
    from servecore.registry.client import fetch, pyfunc_artifact

    uri = (
        f"models:/{EDGE_MODEL}/{args.version}"
        if args.version
        else f"models:/{EDGE_MODEL}@{EDGE_ALIAS}"
    )
    ref, folder = fetch(uri)
    source = pyfunc_artifact(folder, "bundle")
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    print(json.dumps({"bundle": str(out), "model": ref.name, "version": ref.version}))
    if args.archive:
        tar, latest = archive(out, Path(args.archive))
        print(json.dumps({"archive": str(tar), "channel": str(latest)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
