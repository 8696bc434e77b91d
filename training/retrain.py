"""``python -m training.retrain``: retrain the heads on labelled feedback plus the training split,
and start a rollout of them only if they beat the champion offline.

One run, for one application of ``serve_config.yaml``:

1. Take the application's retraining lock in the job store's database (never two runs at once;
   a second one exits with status ``busy``).
2. Read the labelled feedback of the window (answers recorded under ``feedback.record_rate`` and
   labelled through ``POST /v1/feedback``). Fewer than ``--min-feedback`` labels: nothing to do.
   The feedback is split by a hash of the request id: ``--holdout`` of it is kept for evaluation.
3. Embed the training split, the fixed test split and the feedback with the champion encoder's
   own ``Tokenizer`` and ``Encoder`` classes through Ray Data (``map_batches`` of one class, as
   the batch pipeline does); embeddings are kept per encoder version for the next run.
4. Train every embedding head of the application (the kind its champion is, with the project's
   seeded trainer, :func:`training.bootstrap.train_head`) on training split + feedback.
5. Score the champion's ensemble and the candidate's (the new heads, every other member the
   champion's, the spec's weights) on the test split and on the held-out feedback.
6. The candidate beats the champion when it is right more often on the held-out feedback and
   loses at most ``--test-tolerance`` accuracy on the test split. Then the heads are registered
   with their lineage (data window, row counts and digest, parent versions, metrics) and a rollout
   starts (:func:`servecore.rollouts.control.start_rollout`). Otherwise nothing is registered and
   the report says why.

It runs by hand, on a schedule (``--every 86400``) or when the drift alarm holds
(``--on-drift http://host:8000``): see :func:`main`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from servecore import LABELS
from servecore.evaluation import accuracy, macro_f1
from servecore.pipeline.batching import Batch, text_batch
from servecore.rollouts.model import Gates, RolloutPlan, Step, default_steps
from servecore.settings import project_root

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSetup:
    """The served encoder as the retrainer runs it: the pinned version and the application's
    own tokenizer and encoder settings (embeddings as the heads will get them when served)."""

    pin: str
    max_length: int = 256
    max_rows_per_forward: int = 8


_EMBEDDINGS: dict[tuple[EncoderSetup, str], np.ndarray] = {}
"""(encoder setup, text) → embedding, across the runs of one process (``--every``)."""
_EMBEDDINGS_MAX = 200_000


class Embedder:
    """Ray Data's ``map_batches`` class: the application's tokenizer and encoder, loaded once
    per actor from the pinned encoder version."""

    def __init__(self, setup: EncoderSetup) -> None:
        from deployments.encoder import Encoder
        from deployments.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_uri=setup.pin, max_length=setup.max_length)
        self.encoder = Encoder(model_uri=setup.pin, max_rows_per_forward=setup.max_rows_per_forward)

    def __call__(self, batch: Batch) -> Batch:
        embedded = self.encoder(self.tokenizer({"text": batch["text"]}))
        return {"row": batch["row"], "embedding": embedded["embedding"]}


@dataclass
class RetrainOptions:
    app: str = "intent"
    """The Serve application: whose feedback is read and whose rollout starts."""
    config: Path = field(default_factory=lambda: project_root() / "serve_config.yaml")
    config_app: str | None = None
    """The application in ``config`` whose spec names the models (default: ``app``)."""
    window_s: float = 30 * 24 * 3600.0
    """Feedback on answers recorded within this many seconds before the run."""
    min_feedback: int = 20
    holdout: float = 0.3
    test_tolerance: float = 0.01
    num_cpus: float = 1.0
    """CPUs of the embedding actor."""
    start_rollout: bool = True
    steps: list[Step] = field(default_factory=default_steps)
    gates: Gates = field(default_factory=Gates)


@dataclass
class Scores:
    test_accuracy: float
    test_macro_f1: float
    feedback_accuracy: float

    def to_dict(self) -> dict[str, float]:
        return {
            "test_accuracy": self.test_accuracy,
            "test_macro_f1": self.test_macro_f1,
            "feedback_accuracy": self.feedback_accuracy,
        }


def _held_out(request_id: str, position: int, share: float) -> bool:
    return zlib.crc32(f"{request_id}#{position}".encode()) % 1000 < share * 1000


def _digest(texts: Sequence[str], labels: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:16]


def embed(texts: list[str], setup: EncoderSetup, num_cpus: float = 1.0) -> np.ndarray:
    """Embeddings of ``texts`` by the pinned encoder, through Ray Data (only those this process
    has not embedded with that setup before)."""
    missing = sorted({t for t in texts if (setup, t) not in _EMBEDDINGS})
    if missing:
        import ray.data

        from batch.pipeline import configure_progress, connect_ray

        connect_ray()
        configure_progress(False)
        dataset = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(missing)])
        embedded = dataset.map_batches(
            Embedder,
            fn_constructor_kwargs={"setup": setup},
            batch_size=64,
            batch_format="numpy",
            concurrency=1,
            num_cpus=num_cpus,
        ).take_all()
        if len(_EMBEDDINGS) + len(missing) > _EMBEDDINGS_MAX:
            _EMBEDDINGS.clear()
        for row in embedded:
            _EMBEDDINGS[setup, missing[int(row["row"])]] = np.asarray(
                row["embedding"], dtype=np.float32
            )
    return np.stack([_EMBEDDINGS[setup, t] for t in texts])


class Retrainer:
    """One retraining run (see the module docstring)."""

    def __init__(self, options: RetrainOptions) -> None:
        from servecore.config_check import load_app_spec
        from servecore.registry.client import get_client, parse_model_uri, resolve
        from servecore.rollouts.control import get_store

        self.options = options
        self.store = get_store()
        self.client = get_client()
        self.spec = load_app_spec(options.config, options.config_app or options.app)
        self.weights = dict(self.spec.ensemble.weights)
        encoder = resolve(self.spec.encoder.model_uri, self.client)
        # Chunks of the served size: 8 rows per forward pass embedded the 1,050 texts of the
        # dataset in 3.1 s here, the class default's 64 in 5.9 s (padding to the longest).
        self.encoder_setup = EncoderSetup(
            f"models:/{encoder.name}/{encoder.version}",
            self.spec.tokenizer.max_length,
            self.spec.encoder.max_rows_per_forward,
        )
        self.encoder_version = f"{encoder.name}/{encoder.version}"
        self._loaded: dict[str, Any] = {}
        self.members: dict[str, tuple[str, str, str]] = {}
        """member → (input, registered name, champion version)."""
        for member in self.spec.members:
            ref = resolve(member.model_uri, self.client)
            self.members[member.name] = (
                member.input,
                parse_model_uri(member.model_uri)[0],
                ref.version,
            )

    @property
    def heads(self) -> list[str]:
        return [m for m, (kind, _, _) in self.members.items() if kind == "embedding"]

    def _champion(self, member: str) -> Any:
        """The champion's model of ``member`` (a head or a text model), loaded once per run."""
        loaded = self._loaded.get(member)
        if loaded is None:
            from deployments.bag_of_words import BagOfWords
            from deployments.heads import ClassifierHead

            kind, name, version = self.members[member]
            uri = f"models:/{name}/{version}"
            loaded = (
                ClassifierHead(model_uri=uri) if kind == "embedding" else BagOfWords(model_uri=uri)
            )
            self._loaded[member] = loaded
        return loaded

    def _member_probs(self, member: str, texts: list[str], x: np.ndarray) -> np.ndarray:
        model = self._champion(member)
        if self.members[member][0] == "embedding":
            return np.asarray(model({"embedding": x})["probs"])
        return np.asarray(model(text_batch(texts))["probs"])

    def _ensemble_labels(self, probs: dict[str, np.ndarray]) -> list[str]:
        from deployments.ensemble import Ensemble

        out = Ensemble(self.weights)({f"{m}.probs": p for m, p in probs.items()})["probs"]
        return [LABELS[i] for i in np.asarray(out).argmax(axis=1)]

    def champion_labels(self, texts: list[str]) -> list[str]:
        """What the champion's ensemble answers for ``texts`` (as served, offline)."""
        x = embed(texts, self.encoder_setup, self.options.num_cpus)
        return self._ensemble_labels({m: self._member_probs(m, texts, x) for m in self.members})

    def run(self) -> dict[str, Any]:
        holder = f"retrain-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        lock = f"retrain:{self.options.app}"
        held_by = self.store.acquire(lock, holder, lease_s=4 * 3600)
        if held_by is not None:
            return {"status": "busy", "reason": f"another retraining runs ({held_by})"}
        try:
            return self._run()
        finally:
            self.store.release(lock, holder)

    def _run(self) -> dict[str, Any]:
        from servecore.dataset import load_split
        from training.bootstrap import train_head

        options = self.options
        until = time.time()
        since = until - options.window_s
        labelled = self.store.labelled(options.app, since, until)
        window = {"since": since, "until": until, "labels": len(labelled)}
        if len(labelled) < options.min_feedback:
            return {
                "status": "skipped",
                "reason": f"{len(labelled)} labelled answers in the window, fewer than "
                f"{options.min_feedback}",
                "window": window,
            }
        held = [f for f in labelled if _held_out(f.request_id, f.position, options.holdout)]
        used = [f for f in labelled if not _held_out(f.request_id, f.position, options.holdout)]
        if not held or not used:
            return {
                "status": "skipped",
                "reason": f"the feedback split left {len(used)} to train on and {len(held)} to "
                "evaluate on; both need some",
                "window": window,
            }
        train_texts, train_labels = load_split("train")
        test_texts, test_labels = load_split("test")
        texts = train_texts + [f.text for f in used]
        labels = train_labels + [f.label for f in used]
        held_texts, held_labels = [f.text for f in held], [f.label for f in held]
        # One Ray Data job for every text not embedded yet: each job starts an actor that loads
        # the encoder (~7 s of a 2-core machine's time before its first row).
        x_all = embed(texts + test_texts + held_texts, self.encoder_setup, options.num_cpus)
        x_train, x_test, x_held = np.split(x_all, [len(texts), len(texts) + len(test_texts)])

        champion_test = {m: self._member_probs(m, test_texts, x_test) for m in self.members}
        champion_held = {m: self._member_probs(m, held_texts, x_held) for m in self.members}
        nets: dict[str, tuple[Any, dict[str, Any]]] = {}
        candidate_test, candidate_held = dict(champion_test), dict(champion_held)
        for member in self.heads:
            net, config = train_head(self._champion(member).kind, x_train, labels)
            nets[member] = (net, config)
            candidate_test[member] = _softmax(net, x_test)
            candidate_held[member] = _softmax(net, x_held)
        champion = self._scores(champion_test, champion_held, test_labels, held_labels)
        candidate = self._scores(candidate_test, candidate_held, test_labels, held_labels)
        report: dict[str, Any] = {
            "window": window,
            "feedback_train": len(used),
            "feedback_holdout": len(held),
            "champion": champion.to_dict(),
            "candidate": candidate.to_dict(),
        }
        reasons = []
        if candidate.feedback_accuracy <= champion.feedback_accuracy:
            reasons.append(
                f"not better on held-out feedback ({candidate.feedback_accuracy:.3f} against the "
                f"champion's {champion.feedback_accuracy:.3f})"
            )
        if candidate.test_accuracy < champion.test_accuracy - options.test_tolerance:
            reasons.append(
                f"worse on the test split ({candidate.test_accuracy:.3f} against "
                f"{champion.test_accuracy:.3f}, tolerance {options.test_tolerance:g})"
            )
        if reasons:
            report.update(status="rejected", reason="; ".join(reasons))
            return report
        lineage = {
            "lineage.parent_encoder": self.encoder_version,
            "lineage.feedback_since": _iso(since),
            "lineage.feedback_until": _iso(until),
            "lineage.feedback_rows": str(len(used)),
            "lineage.feedback_holdout_rows": str(len(held)),
            "lineage.train_rows": str(len(train_texts)),
            "lineage.data_digest": _digest(texts, labels),
        }
        versions = self._register(nets, lineage, candidate, champion)
        report["versions"] = versions
        report["status"] = "registered"
        if options.start_rollout:
            from servecore.rollouts.control import start_rollout

            plan = RolloutPlan(
                app=options.app,
                candidate=versions,
                steps=options.steps,
                gates=options.gates,
                note=f"retrained on {len(used)} labelled answers",
            )
            rollout = start_rollout(self.store, plan, "retrain", self.client)
            report.update(status="rollout_started", rollout=rollout.id)
        return report

    def _scores(
        self,
        test: dict[str, np.ndarray],
        held: dict[str, np.ndarray],
        test_labels: list[str],
        held_labels: list[str],
    ) -> Scores:
        predicted = self._ensemble_labels(test)
        return Scores(
            test_accuracy=accuracy(test_labels, predicted),
            test_macro_f1=macro_f1(test_labels, predicted, LABELS),
            feedback_accuracy=accuracy(held_labels, self._ensemble_labels(held)),
        )

    def _register(
        self,
        nets: dict[str, tuple[Any, dict[str, Any]]],
        lineage: dict[str, str],
        candidate: Scores,
        champion: Scores,
    ) -> dict[str, str]:
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from servecore.registry.client import experiment_id
        from training import mlflow_models
        from training.bootstrap import PIP_REQUIREMENTS, _save_net

        versions: dict[str, str] = {}
        probs_out = Schema([TensorSpec(np.dtype(np.float32), (-1, len(LABELS)))])
        with tempfile.TemporaryDirectory() as tmp:
            for member, (net, config) in nets.items():
                _, name, parent = self.members[member]
                folder = _save_net(Path(tmp) / name, net, config)
                head_in = Schema([TensorSpec(np.dtype(np.float32), (-1, config["input_dim"]))])
                tags = {
                    **lineage,
                    "lineage.parent": f"{name}/{parent}",
                    "lineage.source": "retrain",
                }
                metrics = {f"candidate_{k}": v for k, v in candidate.to_dict().items()}
                metrics |= {f"champion_{k}": v for k, v in champion.to_dict().items()}
                with mlflow.start_run(
                    experiment_id=experiment_id(self.client), run_name=f"retrain-{name}", tags=tags
                ):
                    mlflow.log_params({k: v for k, v in config.items() if k != "labels"})
                    mlflow.log_metrics(metrics)
                    info = mlflow.pyfunc.log_model(
                        name=name,
                        python_model=mlflow_models.HeadModel(),
                        artifacts={"head": str(folder)},
                        signature=ModelSignature(head_in, probs_out),
                        pip_requirements=PIP_REQUIREMENTS,
                        registered_model_name=name,
                        metadata={"labels": list(LABELS)},
                    )
                version = str(info.registered_model_version)
                for key, value in {**tags, **{k: f"{v:.4f}" for k, v in metrics.items()}}.items():
                    self.client.set_model_version_tag(name, version, key, value)
                versions[name] = version
                logger.info("registered %s version %s (parent %s)", name, version, parent)
        return versions


def _softmax(net: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.asarray(torch.softmax(net(torch.from_numpy(x)), dim=-1).numpy())


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def retrain(options: RetrainOptions) -> dict[str, Any]:
    """One run; the report says what happened (``status``) and why."""
    return Retrainer(options).run()


class Trigger:
    """When the scheduler runs a retraining: every ``every_s`` seconds (0: never by time), and
    after ``drift_checks`` consecutive drift alarms (0: never by drift), at most once per
    ``cooldown_s`` on drift (the alarm may hold until the new model is out)."""

    def __init__(self, every_s: float, drift_checks: int, cooldown_s: float) -> None:
        self.every_s = every_s
        self.drift_checks = drift_checks
        self.cooldown_s = cooldown_s
        self.alarms = 0
        self.last_run: float | None = None

    def wants_drift(self, now: float) -> bool:
        """Whether a drift check is useful now (outside the cooldown after a run)."""
        return self.drift_checks > 0 and (
            self.last_run is None or now - self.last_run >= self.cooldown_s
        )

    def due(self, now: float, alarm: bool | None) -> bool:
        """Record a drift check's result (None: no check) and say whether to run now."""
        if alarm is not None:
            self.alarms = self.alarms + 1 if alarm else 0
        by_time = self.every_s > 0 and (
            self.last_run is None or now - self.last_run >= self.every_s
        )
        by_drift = self.drift_checks > 0 and self.alarms >= self.drift_checks
        if by_time or by_drift:
            self.last_run, self.alarms = now, 0
            return True
        return False


def drift_alarm(url: str, api_key: str | None) -> bool:
    """Whether the application's drift monitor raises its alarm now."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/v1/monitoring/drift", headers=headers, timeout=30)
    response.raise_for_status()
    return bool(response.json().get("alarm"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.retrain", description=__doc__)
    parser.add_argument("--app", default="intent")
    parser.add_argument("--config", type=Path, default=project_root() / "serve_config.yaml")
    parser.add_argument("--window", type=float, default=30 * 24 * 3600.0, help="seconds")
    parser.add_argument("--min-feedback", type=int, default=20)
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--test-tolerance", type=float, default=0.01)
    parser.add_argument("--no-rollout", action="store_true", help="register only")
    parser.add_argument("--every", type=float, default=0.0, help="run every N seconds")
    parser.add_argument(
        "--on-drift", metavar="URL", help="run when the drift alarm of the app at URL holds"
    )
    parser.add_argument("--check-s", type=float, default=60.0, help="drift check interval")
    parser.add_argument("--drift-checks", type=int, default=5, help="consecutive alarms needed")
    parser.add_argument(
        "--cooldown", type=float, default=86400.0, help="seconds between drift-triggered runs"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = RetrainOptions(
        app=args.app,
        config=args.config,
        window_s=args.window,
        min_feedback=args.min_feedback,
        holdout=args.holdout,
        test_tolerance=args.test_tolerance,
        start_rollout=not args.no_rollout,
    )
    if not args.every and not args.on_drift:
        report = retrain(options)
        print(json.dumps(report, indent=2))
        return 0 if report["status"] != "busy" else 3
    trigger = Trigger(args.every, args.drift_checks if args.on_drift else 0, args.cooldown)
    api_key = os.environ.get("INTENT_SERVING_ADMIN_KEY")
    while True:  # a scheduler: runs until stopped
        alarm = None
        if args.on_drift and trigger.wants_drift(time.time()):
            try:
                alarm = drift_alarm(args.on_drift, api_key)
            except Exception as e:  # noqa: BLE001 - no report: wait for the next check
                logger.warning("drift check failed: %r", e)
        if trigger.due(time.time(), alarm):
            try:
                print(json.dumps(retrain(options), indent=2), flush=True)
            except Exception:  # noqa: BLE001 - a failed run waits for the next turn
                logger.exception("retraining failed")
        time.sleep(args.check_s if args.on_drift else max(1.0, min(args.every, 60.0)))


if __name__ == "__main__":
    sys.exit(main())
