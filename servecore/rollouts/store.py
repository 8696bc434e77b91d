"""Where rollouts, their evidence and labelled feedback live: tables beside the jobs in the job
store's database (a sqlite file by default, any SQLAlchemy URL such as PostgreSQL on a cluster).

Nothing of a rollout lives only in a replica: a gateway replica that dies loses at most the
evidence of its last sync interval, and its successor (or any other replica) continues at the same
step.

* ``rollouts`` — one row per rollout, the :class:`~servecore.rollouts.model.Rollout` as JSON, a
  ``revision`` for compare-and-set updates (the leading gateway's evaluations and an operator's
  actions may race; neither overwrites the other), the leader's lease, and ``active_app``, set
  while the rollout runs and unique, so an application never has two.
* ``rollout_evidence`` — what each gateway replica saw since its last sync; the leader folds the
  rows into the rollout and deletes them in the same transaction.
* ``predictions`` / ``feedback`` — the answers recorded for feedback (``feedback.record_rate``)
  and the true labels callers sent for them (``POST /v1/feedback``).
* ``locks`` — named leases (one retraining per application at a time).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from servecore.jobs.store import SqlStore
from servecore.rollouts.model import Accuracy, Evidence, Rollout

metadata = sa.MetaData()
rollouts_table = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("app", sa.String(100), nullable=False, index=True),
    sa.Column("active_app", sa.String(100), unique=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("leader", sa.String(100)),
    sa.Column("lease_until", sa.Float, nullable=False, default=0.0),
    sa.Column("created_at", sa.Float, nullable=False),
)
evidence_table = sa.Table(
    "rollout_evidence",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", sa.String(32), nullable=False, index=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
)
predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(100), primary_key=True),
    sa.Column("app", sa.String(100), nullable=False),
    sa.Column("variant", sa.String(32), nullable=False),
    sa.Column("release", sa.String(500), nullable=False),
    sa.Column("texts", sa.JSON, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)
feedback_table = sa.Table(
    "feedback",
    metadata,
    sa.Column("request_id", sa.String(100), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(100), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)
locks_table = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("until", sa.Float, nullable=False),
)


class RolloutConflict(Exception):
    """The application already has a running rollout."""


class StaleRollout(Exception):
    """The rollout changed between read and write (another writer won): read it again."""


@dataclass(frozen=True)
class Labelled:
    """One text with its true label, from feedback on a recorded answer."""

    request_id: str
    position: int
    text: str
    label: str
    predicted: str
    variant: str
    release: str
    answered_at: float
    labelled_at: float


class RolloutStore(SqlStore):
    """See the module docstring."""

    tables = metadata

    # --- rollouts ---------------------------------------------------------------------------

    def create(self, rollout: Rollout) -> Rollout:
        """Store a new running rollout; :class:`RolloutConflict` when its app has one."""
        row = {
            "id": rollout.id,
            "app": rollout.app,
            "active_app": rollout.app if rollout.active else None,
            "status": rollout.status,
            "state": rollout.model_dump_json(),
            "revision": 1,
            "lease_until": 0.0,
            "created_at": rollout.started_at,
        }
        try:
            with self._tx() as tx:
                tx.execute(rollouts_table.insert().values(**row))
        except sa.exc.IntegrityError as e:
            active = self.active(rollout.app)
            raise RolloutConflict(
                f"application {rollout.app!r} already runs rollout "
                f"{active.id if active else '?'}: one at a time (abort it first)"
            ) from e
        return rollout

    @staticmethod
    def _load(row: Any) -> tuple[Rollout, int]:
        return Rollout.model_validate_json(row.state), int(row.revision)

    def get(self, rollout_id: str) -> Rollout | None:
        with self._tx() as tx:
            row = tx.execute(
                sa.select(rollouts_table).where(rollouts_table.c.id == rollout_id)
            ).first()
        return None if row is None else self._load(row)[0]

    def active(self, app: str) -> Rollout | None:
        """The application's running rollout, else None."""
        with self._tx() as tx:
            row = tx.execute(
                sa.select(rollouts_table).where(rollouts_table.c.active_app == app)
            ).first()
        return None if row is None else self._load(row)[0]

    def current(self, app: str) -> Rollout | None:
        """The rollout the application's gateways follow: the running one, else the newest one
        whose end the registry does not reflect yet (a promotion being applied)."""
        with self._tx() as tx:
            row = tx.execute(
                sa.select(rollouts_table)
                .where(rollouts_table.c.app == app)
                .order_by(rollouts_table.c.created_at.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        rollout = self._load(row)[0]
        return rollout if rollout.active or not rollout.effects_done else None

    def recent(self, app: str | None = None, limit: int = 50) -> list[Rollout]:
        query = sa.select(rollouts_table).order_by(rollouts_table.c.created_at.desc()).limit(limit)
        if app is not None:
            query = query.where(rollouts_table.c.app == app)
        with self._tx() as tx:
            rows = tx.execute(query).all()
        return [self._load(row)[0] for row in rows]

    def update(
        self, rollout_id: str, change: Callable[[Rollout], Any], attempts: int = 20
    ) -> tuple[Rollout, Any]:
        """Apply ``change`` (which edits the rollout in place and returns anything) by
        compare-and-set, retrying on a concurrent write; returns the stored rollout and what
        ``change`` returned. KeyError when there is no such rollout; ``change``'s errors pass."""
        for _ in range(attempts):
            with self._tx() as tx:
                row = tx.execute(
                    sa.select(rollouts_table).where(rollouts_table.c.id == rollout_id)
                ).first()
            if row is None:
                raise KeyError(rollout_id)
            rollout, revision = self._load(row)
            result = change(rollout)
            if self._write(rollout, revision):
                return rollout, result
        raise StaleRollout(f"rollout {rollout_id} kept changing under {attempts} attempts")

    def _write(self, rollout: Rollout, revision: int, tx: sa.Connection | None = None) -> bool:
        values = {
            "state": rollout.model_dump_json(),
            "status": rollout.status,
            "active_app": rollout.app if rollout.active else None,
            "revision": revision + 1,
        }
        statement = (
            rollouts_table.update()
            .where(rollouts_table.c.id == rollout.id, rollouts_table.c.revision == revision)
            .values(**values)
        )
        if tx is not None:
            return bool(tx.execute(statement).rowcount)
        with self._tx() as own:
            return bool(own.execute(statement).rowcount)

    def lead(self, rollout_id: str, replica: str, lease_s: float, now: float | None = None) -> bool:
        """Take or renew the lease on evaluating ``rollout_id``; whether ``replica`` holds it."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            taken = tx.execute(
                rollouts_table.update()
                .where(
                    rollouts_table.c.id == rollout_id,
                    sa.or_(
                        rollouts_table.c.leader == replica,
                        rollouts_table.c.lease_until < now,
                        rollouts_table.c.leader.is_(None),
                    ),
                )
                .values(leader=replica, lease_until=now + lease_s)
            ).rowcount
        return bool(taken)

    # --- evidence ---------------------------------------------------------------------------

    def add_evidence(self, rollout_id: str, step: int, evidence: Evidence) -> None:
        with self._tx() as tx:
            tx.execute(
                evidence_table.insert().values(
                    rollout_id=rollout_id, step=step, payload=evidence.model_dump_json()
                )
            )

    def drop_evidence(self, rollout_id: str) -> None:
        with self._tx() as tx:
            tx.execute(evidence_table.delete().where(evidence_table.c.rollout_id == rollout_id))

    def fold_evidence(
        self, rollout_id: str, judge: Callable[[Rollout], Any], rng: random.Random | None = None
    ) -> tuple[Rollout, Any] | None:
        """Merge the rollout's pending evidence rows of its current step into it (rows of
        other steps are dropped: they were gathered under another split), call ``judge`` on it,
        store it and delete the rows, in one transaction; None when another writer won (try at
        the next sync) or the rollout is gone."""
        rng = rng or random.Random()
        with self._tx() as tx:
            row = tx.execute(
                sa.select(rollouts_table).where(rollouts_table.c.id == rollout_id)
            ).first()
            if row is None:
                return None
            rollout, revision = self._load(row)
            rows = tx.execute(
                sa.select(evidence_table).where(evidence_table.c.rollout_id == rollout_id)
            ).all()
            for found in rows:
                if found.step == rollout.step and rollout.active:
                    rollout.evidence.merge(Evidence.model_validate_json(found.payload), rng)
            result = judge(rollout)
            if not self._write(rollout, revision, tx):
                tx.rollback()
                return None
            if rows:
                tx.execute(
                    evidence_table.delete().where(
                        evidence_table.c.rollout_id == rollout_id,
                        evidence_table.c.seq <= max(r.seq for r in rows),
                    )
                )
        return rollout, result

    # --- predictions and feedback -----------------------------------------------------------

    def record_predictions(self, records: Iterable[dict[str, Any]]) -> None:
        rows = list(records)
        if not rows:
            return
        with self._tx() as tx:
            tx.execute(predictions_table.insert(), rows)

    def add_feedback(
        self, request_id: str, position: int, label: str, now: float
    ) -> dict[str, Any]:
        """Store the true label of text ``position`` of a recorded answer (again: replaced).
        KeyError when the answer was not recorded; IndexError for a position it lacks."""
        with self._tx() as tx:
            answer = tx.execute(
                sa.select(predictions_table).where(predictions_table.c.request_id == request_id)
            ).first()
            if answer is None:
                raise KeyError(request_id)
            if not 0 <= position < len(answer.labels):
                raise IndexError(position)
            replaced = tx.execute(
                feedback_table.delete().where(
                    feedback_table.c.request_id == request_id,
                    feedback_table.c.position == position,
                )
            ).rowcount
            tx.execute(
                feedback_table.insert().values(
                    request_id=request_id, position=position, label=label, created_at=now
                )
            )
        return {
            "request_id": request_id,
            "position": position,
            "label": label,
            "predicted": answer.labels[position],
            "variant": answer.variant,
            "correct": answer.labels[position] == label,
            "replaced": bool(replaced),
        }

    def labelled(
        self, app: str, since: float = 0.0, until: float | None = None, limit: int = 100_000
    ) -> list[Labelled]:
        """Labelled texts of ``app`` whose answers were recorded in ``[since, until)``."""
        until = time.time() + 1 if until is None else until
        query = (
            sa.select(
                predictions_table,
                feedback_table.c.position,
                feedback_table.c.label,
                feedback_table.c.created_at.label("labelled_at"),
            )
            .join(feedback_table, feedback_table.c.request_id == predictions_table.c.request_id)
            .where(
                predictions_table.c.app == app,
                predictions_table.c.created_at >= since,
                predictions_table.c.created_at < until,
            )
            .order_by(predictions_table.c.created_at)
            .limit(limit)
        )
        with self._tx() as tx:
            rows = tx.execute(query).all()
        return [
            Labelled(
                request_id=row.request_id,
                position=row.position,
                text=row.texts[row.position],
                label=row.label,
                predicted=row.labels[row.position],
                variant=row.variant,
                release=row.release,
                answered_at=row.created_at,
                labelled_at=row.labelled_at,
            )
            for row in rows
        ]

    def accuracy(self, app: str, since: float) -> dict[str, Accuracy]:
        """Per variant, labelled texts answered since ``since`` and how many it got right."""
        found: dict[str, Accuracy] = {}
        for item in self.labelled(app, since):
            acc = found.setdefault(item.variant, Accuracy())
            acc.labelled += 1
            acc.correct += int(item.predicted == item.label)
        return found

    def forget_predictions(self, older_than: float) -> int:
        """Delete recorded answers (and their feedback) older than ``older_than``."""
        with self._tx() as tx:
            old = sa.select(predictions_table.c.request_id).where(
                predictions_table.c.created_at < older_than
            )
            tx.execute(feedback_table.delete().where(feedback_table.c.request_id.in_(old)))
            return int(
                tx.execute(
                    predictions_table.delete().where(predictions_table.c.created_at < older_than)
                ).rowcount
            )

    # --- locks ------------------------------------------------------------------------------

    def acquire(self, name: str, holder: str, lease_s: float) -> str | None:
        """Take lock ``name`` for ``lease_s`` (or renew it); None when ``holder`` has it, else
        who holds it."""
        now = time.time()
        try:
            with self._tx() as tx:
                row = tx.execute(sa.select(locks_table).where(locks_table.c.name == name)).first()
                if row is None:
                    tx.execute(
                        locks_table.insert().values(name=name, holder=holder, until=now + lease_s)
                    )
                    return None
                if row.holder != holder and row.until > now:
                    return str(row.holder)
                taken = tx.execute(
                    locks_table.update()
                    .where(locks_table.c.name == name, locks_table.c.holder == row.holder)
                    .values(holder=holder, until=now + lease_s)
                ).rowcount
        except sa.exc.IntegrityError:
            return "another process"
        return None if taken else "another process"

    def release(self, name: str, holder: str) -> None:
        with self._tx() as tx:
            tx.execute(
                locks_table.delete().where(
                    locks_table.c.name == name, locks_table.c.holder == holder
                )
            )
