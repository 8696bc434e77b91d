"""The durable record of every asynchronous job: the store that the API reads and the runners write.

The broker (Celery, through Ray Serve's task processor) only carries job ids. What a caller sees —
state, progress, result, webhook deliveries, owner, idempotency key — lives here, in one SQL table
reached through SQLAlchemy: a sqlite file beside the registry by default (one machine), any
SQLAlchemy URL (PostgreSQL) when runners sit on several nodes.

Why a store of our own beside the broker: Celery's result backend cannot list, page, count or
deduplicate, and whether a broker redelivers a message after a crash depends on the broker
(Redis does after its visibility timeout; the embedded filesystem broker never does). Here:

- A runner **claims** a job before working on it, which raises ``attempt`` and takes a lease that
  it renews while it works. A second message for the same job finds it claimed and does nothing.
- A runner that dies stops renewing; once the lease has lapsed, any runner's **reaper** sends the
  job again and the next claim takes it over.
- Results are written by **compare-and-set** on ``(id, attempt, state='running')``: only the
  attempt that holds the claim can finish the job, so its visible result is written exactly once
  even when a job had to run twice.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import sqlalchemy as sa
from pydantic import BaseModel, Field

from servecore.errors import IdempotencyConflict, InvalidRequest, JobFinished, JobNotFound
from servecore.settings import Settings

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
JobKind = Literal["texts", "dataset"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

WebhookState = Literal["none", "pending", "delivering", "delivered", "failed"]

metadata = sa.MetaData()
jobs_table = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("seq", sa.Float, nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("done", sa.Integer, nullable=False, default=0),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("enqueued_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("runner", sa.String(200)),
    sa.Column("lease_until", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.JSON),
    sa.Column("callback_url", sa.String(2048)),
    sa.Column("webhook_state", sa.String(16), nullable=False, default="none"),
    sa.Column("webhook_next_at", sa.Float),
    sa.Column("deliveries", sa.JSON, nullable=False, default=list),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_owner_idempotency_key"),
)


class Delivery(BaseModel):
    """One attempt to POST a job's completion to its ``callback_url``."""

    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    took_s: float = 0.0


class Job(BaseModel):
    """A job as the API shows it."""

    id: str
    kind: JobKind
    owner: str
    state: JobState
    done: int = Field(description="items processed so far (texts, or rows of a dataset)")
    total: int = Field(description="items in the job; 0 until a dataset has been counted")
    progress: float = Field(ge=0.0, le=1.0)
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int = Field(description="times a runner started the job (more than 1 after a crash)")
    cancel_requested: bool
    idempotency_key: str | None
    callback_url: str | None
    webhook_state: WebhookState
    deliveries: list[Delivery]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    request: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _job(row: Any) -> Job:
    done, total = int(row.done or 0), int(row.total or 0)
    progress = 1.0 if row.state == "succeeded" else (min(done / total, 1.0) if total else 0.0)
    return Job(
        id=row.id,
        kind=row.kind,
        owner=row.owner,
        state=row.state,
        done=done,
        total=total,
        progress=progress,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        attempts=row.attempt,
        cancel_requested=bool(row.cancel_requested),
        idempotency_key=row.idempotency_key,
        callback_url=row.callback_url,
        webhook_state=row.webhook_state,
        deliveries=[Delivery.model_validate(d) for d in row.deliveries or []],
        result=row.result,
        error=row.error,
        request=row.request,
    )


def sql_engine(url: str) -> sa.Engine:
    """An engine for one of the platform's SQL stores (jobs, rollouts). For sqlite, the embedded
    default: its folder is created, and WAL journaling lets readers never wait for the writer
    while several processes share the file."""
    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite"):
        connect_args = {"timeout": 30, "check_same_thread": False}
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args=connect_args, future=True)
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


class SqlStore:
    """A store of tables in one database (``tables``, created when missing); every method of a
    subclass is one short transaction (:meth:`_tx`), safe to share between threads and
    processes."""

    tables: sa.MetaData

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sql_engine(url)
        self.tables.create_all(self.engine)

    @contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as connection:
            yield connection


class JobStore(SqlStore):
    """Jobs in one SQL table (see the module docstring)."""

    tables = metadata

    # --- the API's side -----------------------------------------------------------------------

    def create(
        self,
        *,
        owner: str,
        kind: JobKind,
        request: dict[str, Any],
        total: int,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
    ) -> tuple[Job, bool]:
        """A new queued job, or the existing one for ``(owner, idempotency_key)``.

        Returns ``(job, created)``. The same key with another body is a conflict, not a new job.
        """
        digest = request_hash(request)
        if idempotency_key is not None:
            existing = self._by_key(owner, idempotency_key)
            if existing is not None:
                return self._same_request(existing, digest), False
        now = time.time()
        job_id = str(uuid.uuid4())
        try:
            with self._tx() as tx:
                tx.execute(
                    jobs_table.insert().values(
                        id=job_id,
                        seq=now,
                        owner=owner,
                        kind=kind,
                        state="queued",
                        request=request,
                        request_hash=digest,
                        idempotency_key=idempotency_key,
                        done=0,
                        total=total,
                        created_at=now,
                        attempt=0,
                        cancel_requested=False,
                        callback_url=callback_url,
                        webhook_state="none",
                        deliveries=[],
                    )
                )
        except sa.exc.IntegrityError:
            # Two submissions with one key raced; the first one's job is the job.
            existing = self._by_key(owner, idempotency_key or "")
            if existing is None:
                raise
            return self._same_request(existing, digest), False
        return self.get(job_id), True

    def _by_key(self, owner: str, key: str) -> Any:
        with self._tx() as tx:
            return tx.execute(
                sa.select(jobs_table).where(
                    jobs_table.c.owner == owner, jobs_table.c.idempotency_key == key
                )
            ).first()

    @staticmethod
    def _same_request(row: Any, digest: str) -> Job:
        if row.request_hash != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {row.idempotency_key!r} was already used for job {row.id} "
                "with a different request body"
            )
        return _job(row)

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job; :class:`JobNotFound` when it does not exist or belongs to someone else
        (the two are indistinguishable to a caller on purpose)."""
        with self._tx() as tx:
            row = tx.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).first()
        if row is None or (owner is not None and row.owner != owner):
            raise JobNotFound(f"no job {job_id!r}")
        return _job(row)

    def page(
        self,
        owner: str,
        *,
        limit: int = 50,
        after: str | None = None,
        state: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """The owner's jobs, newest first, ``limit`` at a time; pass the returned cursor as
        ``after`` for the next page (``None`` when there is none)."""
        query = sa.select(jobs_table).where(jobs_table.c.owner == owner)
        if state is not None:
            query = query.where(jobs_table.c.state == state)
        if after is not None:
            with self._tx() as tx:
                anchor = tx.execute(
                    sa.select(jobs_table.c.seq, jobs_table.c.id).where(
                        jobs_table.c.id == after, jobs_table.c.owner == owner
                    )
                ).first()
            if anchor is None:
                raise JobNotFound(f"cursor {after!r} is not one of your jobs")
            query = query.where(
                sa.or_(
                    jobs_table.c.seq < anchor.seq,
                    sa.and_(jobs_table.c.seq == anchor.seq, jobs_table.c.id < anchor.id),
                )
            )
        query = query.order_by(jobs_table.c.seq.desc(), jobs_table.c.id.desc()).limit(limit + 1)
        with self._tx() as tx:
            rows = tx.execute(query).all()
        page = [_job(r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Cancel a queued job at once; ask a running one to stop (its runner checks between
        chunks and finishes it as ``cancelled``). A finished job cannot be cancelled."""
        job = self.get(job_id, owner)
        if job.terminal:
            raise JobFinished(f"job {job_id} already {job.state}")
        now = time.time()
        with self._tx() as tx:
            cancelled = tx.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.state == "queued")
                .values(
                    state="cancelled",
                    cancel_requested=True,
                    finished_at=now,
                    error={"type": "cancelled", "message": "cancelled before it started"},
                    **self._webhook_due(job.callback_url, now),
                )
            ).rowcount
            if not cancelled:
                tx.execute(
                    jobs_table.update()
                    .where(jobs_table.c.id == job_id, jobs_table.c.state == "running")
                    .values(cancel_requested=True)
                )
        return self.get(job_id)

    def mark_enqueued(self, job_id: str) -> None:
        with self._tx() as tx:
            tx.execute(
                jobs_table.update().where(jobs_table.c.id == job_id).values(enqueued_at=time.time())
            )

    def counts(self) -> dict[str, int]:
        """Jobs per state (for the queue-depth autoscaling policy and the metrics)."""
        with self._tx() as tx:
            rows = tx.execute(
                sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)
            ).all()
        return {state: int(n) for state, n in rows}

    # --- the runners' side --------------------------------------------------------------------

    def claim(self, job_id: str, runner: str, lease_s: float) -> int | None:
        """Take the job for one attempt: a queued job, or a running one whose lease lapsed (its
        runner died). Returns the attempt number, or ``None`` when the job is someone else's,
        finished, or cancelled."""
        now = time.time()
        with self._tx() as tx:
            taken = tx.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.id == job_id,
                    jobs_table.c.cancel_requested.is_(False),
                    sa.or_(
                        jobs_table.c.state == "queued",
                        sa.and_(jobs_table.c.state == "running", jobs_table.c.lease_until < now),
                    ),
                )
                .values(
                    state="running",
                    attempt=jobs_table.c.attempt + 1,
                    runner=runner,
                    lease_until=now + lease_s,
                    started_at=sa.func.coalesce(jobs_table.c.started_at, now),
                    done=0,
                )
            ).rowcount
            if not taken:
                return None
            return int(
                tx.execute(
                    sa.select(jobs_table.c.attempt).where(jobs_table.c.id == job_id)
                ).scalar_one()
            )

    def heartbeat(
        self, job_id: str, attempt: int, lease_s: float, done: int, total: int | None = None
    ) -> bool:
        """Renew the lease and record progress. False means stop: the claim was lost (another
        runner took over) or a cancel was requested."""
        values: dict[str, Any] = {"lease_until": time.time() + lease_s, "done": done}
        if total is not None:
            values["total"] = total
        return self._update_held(job_id, attempt, values, unless_cancelled=True)

    def finish(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        done: int | None = None,
    ) -> bool:
        """Write the job's outcome once: only the attempt holding the claim can. A running job
        whose cancel was requested always ends ``cancelled``."""
        now = time.time()
        job = self.get(job_id)
        if job.cancel_requested and state != "cancelled":
            state, result = "cancelled", None
            error = {"type": "cancelled", "message": "cancelled while running"}
        values: dict[str, Any] = {
            "state": state,
            "result": result,
            "error": error,
            "finished_at": now,
            "lease_until": None,
            **self._webhook_due(job.callback_url, now),
        }
        if done is not None:
            values["done"] = done
        return self._update_held(job_id, attempt, values)

    def _update_held(
        self, job_id: str, attempt: int, values: dict[str, Any], unless_cancelled: bool = False
    ) -> bool:
        """Update the job only if ``attempt`` still holds it (compare-and-set)."""
        conditions = [
            jobs_table.c.id == job_id,
            jobs_table.c.attempt == attempt,
            jobs_table.c.state == "running",
        ]
        if unless_cancelled:
            conditions.append(jobs_table.c.cancel_requested.is_(False))
        with self._tx() as tx:
            updated = tx.execute(jobs_table.update().where(*conditions).values(**values)).rowcount
        return bool(updated)

    @staticmethod
    def _webhook_due(callback_url: str | None, now: float) -> dict[str, Any]:
        if callback_url is None:
            return {}
        return {"webhook_state": "pending", "webhook_next_at": now}

    def stalled(self, queued_after_s: float) -> list[str]:
        """Jobs to send again: running with a lapsed lease (the runner died), or queued and not
        picked up for ``queued_after_s`` since they were last sent (the message was lost)."""
        now = time.time()
        with self._tx() as tx:
            rows = tx.execute(
                sa.select(jobs_table.c.id).where(
                    jobs_table.c.cancel_requested.is_(False),
                    sa.or_(
                        sa.and_(jobs_table.c.state == "running", jobs_table.c.lease_until < now),
                        sa.and_(
                            jobs_table.c.state == "queued",
                            sa.func.coalesce(jobs_table.c.enqueued_at, jobs_table.c.created_at)
                            < now - queued_after_s,
                        ),
                    ),
                )
            ).all()
        return [r.id for r in rows]

    def abandon_cancelled(self) -> list[str]:
        """Running jobs that were asked to stop and whose runner died: finish them cancelled."""
        now = time.time()
        with self._tx() as tx:
            rows = tx.execute(
                sa.select(jobs_table.c.id, jobs_table.c.callback_url).where(
                    jobs_table.c.state == "running",
                    jobs_table.c.cancel_requested.is_(True),
                    jobs_table.c.lease_until < now,
                )
            ).all()
            for row in rows:
                tx.execute(
                    jobs_table.update()
                    .where(jobs_table.c.id == row.id, jobs_table.c.state == "running")
                    .values(
                        state="cancelled",
                        finished_at=now,
                        error={"type": "cancelled", "message": "cancelled while running"},
                        **self._webhook_due(row.callback_url, now),
                    )
                )
        return [r.id for r in rows]

    # --- webhooks -----------------------------------------------------------------------------

    def claim_delivery(self, lease_s: float) -> Job | None:
        """One finished job whose webhook is due, taken for ``lease_s`` (a deliverer that dies
        leaves it to the next one after that)."""
        now = time.time()
        with self._tx() as tx:
            row = tx.execute(
                sa.select(jobs_table.c.id)
                .where(
                    jobs_table.c.webhook_state.in_(("pending", "delivering")),
                    jobs_table.c.webhook_next_at <= now,
                )
                .order_by(jobs_table.c.webhook_next_at)
                .limit(1)
            ).first()
            if row is None:
                return None
            taken = tx.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.id == row.id,
                    jobs_table.c.webhook_state.in_(("pending", "delivering")),
                    jobs_table.c.webhook_next_at <= now,
                )
                .values(webhook_state="delivering", webhook_next_at=now + lease_s)
            ).rowcount
        return self.get(row.id) if taken else None

    def record_delivery(
        self, job_id: str, delivery: Delivery, *, delivered: bool, retry_at: float | None
    ) -> None:
        """Append an attempt; ``retry_at=None`` on a failure means the retries are used up."""
        job = self.get(job_id)
        state: WebhookState = (
            "delivered" if delivered else ("pending" if retry_at is not None else "failed")
        )
        with self._tx() as tx:
            tx.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id)
                .values(
                    deliveries=[*(d.model_dump() for d in job.deliveries), delivery.model_dump()],
                    webhook_state=state,
                    webhook_next_at=retry_at,
                )
            )


def public_job(job: Job, *, with_result: bool = True) -> dict[str, Any]:
    """A job as callers see it: the request is summarised (a texts job would repeat every text),
    the result is left out of listings."""
    data = job.model_dump(exclude={"request", "result"} if not with_result else {"request"})
    request = job.request
    data["input"] = (
        {"texts": len(request["texts"])} if "texts" in request else {"dataset": request["dataset"]}
    )
    return data


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dataset_path(settings: Settings, path: str) -> Path:
    """``path`` resolved inside the jobs data folder; a path that leaves it is refused."""
    root = settings.job_data_dir
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise InvalidRequest(f"dataset.path must lie inside the jobs data folder {root}")
    has_glob = any(ch in resolved.name for ch in "*?[")
    if not has_glob and not resolved.exists():
        raise InvalidRequest(f"dataset.path {path!r} does not exist in the jobs data folder")
    return resolved
