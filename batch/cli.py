"""``python -m batch``: score files offline with the Serve application's models, or check that the
offline and online paths agree.

Examples::

    python -m batch run --input data/intents.csv --output /tmp/intents-scored
    python -m batch run --app breast-cancer --input rows.parquet --output /tmp/scored
    python -m batch parity --input data/intents.csv --url http://127.0.0.1:8000
    python -m batch reference           # drift reference profile of the champion release
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from batch.parity import DEFAULT_TOLERANCE, run_parity
from batch.pipeline import JobOptions, connect_ray, run_job
from batch.plan import DEFAULT_BATCH_SIZE, RESOURCE_FIELDS
from servecore.errors import ConfigError

logger = logging.getLogger("batch")

DESCRIPTION = """\
Offline (batch) inference with the same models and pipeline spec as the online Serve app.

The pipeline is read from an application in a Serve config file: its `args` name the stages and
their registry models, its `deployments` give each stage's CPUs, GPUs and actor pool size. Every
stage becomes one Ray Data `map_batches` over an actor pool.

commands:
  run     score files (parquet, CSV or JSON lines) into parquet, with a summary
  parity  score the same texts offline and through a running Serve app; fail on any difference
  reference  compute the drift reference profile of a release and store it in MLflow
"""

RUN_EPILOG = """\
output folder:
  predictions/   parquet: id, label, prob_<label> for every label, model_versions
  rejects/       parquet: id, raw, reason (null, empty, not_a_string, too_long, invalid_json)
  summary.json   rows in/scored/rejected, rows per second, elapsed and Ray start-up time,
                 model versions, the resources each stage ran with

example:
  python -m batch run --input 'data/*.parquet' --output /tmp/scored --encoder-actors 2
  ray job submit --working-dir . -- python -m batch run --input /data/in.csv --output /data/out
"""

PARITY_EPILOG = """\
Exit status 0 when every label matches and every probability is within the tolerance,
1 otherwise (the worst rows are printed), 2 on a usage or configuration error.

example:
  serve run serve_config.yaml &   # the online app, on http://127.0.0.1:8000
  python -m batch parity --input data/intents.csv --url http://127.0.0.1:8000
"""


def _stage_option(value: str) -> tuple[str, str, float]:
    try:
        target, number = value.split("=", 1)
        stage, option = target.split(".", 1)
        return stage, option, float(number)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected STAGE.OPTION=VALUE (e.g. Encoder.max_actors=2), got {value!r}"
        ) from e


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("what to score")
    where.add_argument(
        "--input",
        required=True,
        help="a file, a folder or a glob (quote it) of .parquet, .csv or .jsonl files",
    )
    where.add_argument("--text-column", default="text", help="column holding the text")
    where.add_argument("--id-column", default="id", help="column identifying each row")

    app = parser.add_argument_group("which pipeline")
    app.add_argument(
        "--config", default="serve_config.yaml", help="Serve config file (default: %(default)s)"
    )
    app.add_argument(
        "--app", default="intent", help="application in the config (default: %(default)s)"
    )

    ray_group = parser.add_argument_group("where and how it runs")
    ray_group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 127.0.0.1:6379); default $RAY_ADDRESS, else a "
        "private local cluster is started for the job",
    )
    ray_group.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="rows per stage call (default: %(default)s)",
    )
    ray_group.add_argument(
        "--encoder-actors",
        type=int,
        default=None,
        help="fixed number of actors of the encoder's stage group",
    )
    ray_group.add_argument(
        "--encoder-cpus", type=float, default=None, help="CPUs per actor of the encoder's group"
    )
    ray_group.add_argument(
        "--encoder-gpus",
        type=float,
        default=None,
        help="GPUs (or a fraction) per actor of the encoder's group",
    )
    ray_group.add_argument(
        "--stage-option",
        action="append",
        type=_stage_option,
        default=[],
        metavar="STAGE.OPTION=VALUE",
        help="any stage group's resources (a stage name means its group), repeatable; OPTION is "
        f"one of {', '.join(RESOURCE_FIELDS)} (e.g. --stage-option Pipeline.num_cpus=0.5)",
    )
    ray_group.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="blocks to split the input into (default: enough for every actor to get work)",
    )
    ray_group.add_argument(
        "--no-fit",
        dest="fit_to_cluster",
        action="store_false",
        help="do not shrink CPU requests to what the cluster has free (e.g. on an "
        "autoscaling cluster that will grow)",
    )
    ray_group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Ray Data progress bars (default: on when stdout is a terminal)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batch",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="score files into parquet",
        description="Score files with the application's pipeline on Ray Data.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(run)
    run.add_argument("--output", required=True, help="output folder (local path or URI)")
    run.add_argument(
        "--keep-text", action="store_true", help="copy the text into the predictions too"
    )

    parity = commands.add_parser(
        "parity",
        help="compare the batch path with a running Serve app",
        description="Send the same texts through the batch pipeline and the running Serve "
        "application (POST /v1/predict), and compare labels and probabilities.",
        epilog=PARITY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(parity)
    parity.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="base URL of the Serve app (default: %(default)s)",
    )
    parity.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest allowed probability difference (default: %(default)g)",
    )
    parity.add_argument(
        "--label-agreement",
        type=float,
        default=1.0,
        help="share of labels that must agree (default: %(default)g, every one; the int8 "
        "profile: 0.99, what its accuracy gate allows)",
    )
    parity.add_argument("--worst", type=int, default=10, help="worst rows to print")
    parity.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds")

    reference = commands.add_parser(
        "reference",
        help="store the drift reference profile of a release in MLflow",
        description="Score the training data with the release behind an alias (the batch "
        "pipeline, embeddings kept), build the drift reference profile (label centroids, "
        "nearest-centroid similarity distribution, predicted-label shares) and store it as an "
        "MLflow artifact tagged on every model version of the release. The bootstrap does this "
        "for the models it registers; run it after registering a version by other means.",
    )
    reference.add_argument("--config", default="serve_config.yaml", help="Serve config file")
    reference.add_argument("--app", default="intent", help="application in the config")
    reference.add_argument("--alias", default="champion", help="release to profile")
    reference.add_argument(
        "--data",
        default=None,
        help="CSV with text, label and split columns (default: the shipped data/intents.csv)",
    )
    reference.add_argument("--split", default="train", help="rows of this split (train)")
    reference.add_argument(
        "--force", action="store_true", help="recompute even if the encoder has a profile"
    )
    reference.add_argument("--address", default=None, help="Ray cluster to join")
    reference.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    return parser


def run_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from batch.reference import ensure_reference
    from servecore.dataset import load_split

    texts, labels = load_split(args.split, Path(args.data) if args.data else None)
    if not texts:
        logger.error("no rows of split %r", args.split)
        return 2
    started_ray, _ = connect_ray(args.address)
    try:
        uri = ensure_reference(
            args.config, args.app, texts, labels, alias=args.alias, force=args.force
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(uri or "the encoder already has a profile (use --force to recompute)")
    return 0


def options_from(args: argparse.Namespace) -> JobOptions:
    overrides: dict[str, dict[str, float]] = {}
    for stage, option, value in args.stage_option:
        overrides.setdefault(stage, {})[option] = value
    encoder = overrides.setdefault("Encoder", {})
    if args.encoder_actors is not None:
        encoder["min_actors"] = encoder["max_actors"] = args.encoder_actors
    if args.encoder_cpus is not None:
        encoder["num_cpus"] = args.encoder_cpus
    if args.encoder_gpus is not None:
        encoder["num_gpus"] = args.encoder_gpus
    return JobOptions(
        input=args.input,
        config=args.config,
        app=args.app,
        output=getattr(args, "output", None),
        text_column=args.text_column,
        id_column=args.id_column,
        batch_size=args.batch_size,
        num_blocks=args.num_blocks,
        overrides={stage: values for stage, values in overrides.items() if values},
        keep_text=getattr(args, "keep_text", False),
        fit_to_cluster=args.fit_to_cluster,
        progress=args.progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    if args.command == "reference":
        try:
            return run_reference(args)
        except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
            logger.error("%s", e)
            return 2
    try:
        options = options_from(args)
        started_ray, startup_s = connect_ray(args.address)
    except (ConfigError, ValueError, OSError) as e:
        logger.error("%s", e)
        return 2
    try:
        from batch.model_job import is_model_app, run_model_job, run_model_parity

        generic = is_model_app(options.config, options.app)
        if args.command == "run":
            job = run_model_job if generic else run_job
            summary = job(options, ray_startup_s=startup_s)
            print(json.dumps(summary, indent=2))
            return 0
        if generic:
            found = run_model_parity(options, args.url, args.tolerance, args.timeout)
            print(found.format())
            return 0 if found.ok else 1
        report = run_parity(
            options, args.url, args.tolerance, args.worst, args.timeout, args.label_agreement
        )
        print(report.format())
        return 0 if report.ok else 1
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    finally:
        if started_ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
