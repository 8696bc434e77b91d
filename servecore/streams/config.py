"""The stream consumer's live knobs (``user_config`` of the ``StreamConsumer`` deployment).

Which Redis the streams live on is a setting (``INTENT_SERVING_STREAMS_URL``); everything here
changes in place through ``reconfigure`` (a changed stream list stops and starts only the readers
whose stream changed).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

StreamName = str


class StreamSpec(BaseModel):
    """One input stream and where its answers go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: StreamName = Field(min_length=1, max_length=200)
    """The stream messages are read from (created with the group when missing)."""
    output: StreamName | None = Field(default=None, min_length=1, max_length=200)
    """Where one result per message is written; default ``<input>:results``."""
    dead_letter: StreamName | None = Field(default=None, min_length=1, max_length=200)
    """Where messages that cannot be scored go, with the reason; default ``<input>:dead``."""
    group: str = Field(default="intent-serving", min_length=1, max_length=200)
    """The consumer group every replica reads through (each message goes to one of them)."""

    @property
    def output_stream(self) -> str:
        return self.output or f"{self.input}:results"

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter or f"{self.input}:dead"

    @property
    def done_prefix(self) -> str:
        """Prefix of the per-message idempotency keys (``<prefix><message id>``)."""
        return f"{self.input}:done:{self.group}:"

    @property
    def stats_key(self) -> str:
        """Hash of the group's totals (scored, dead letters, duplicates dropped)."""
        return f"{self.input}:stats:{self.group}"

    @property
    def heartbeat_key(self) -> str:
        """Hash of each live consumer's recent rate and latency (``GET /v1/streams``)."""
        return f"{self.input}:consumers:{self.group}"

    @model_validator(mode="after")
    def _distinct(self) -> StreamSpec:
        names = [self.input, self.output_stream, self.dead_letter_stream]
        if len(set(names)) != 3:
            raise ValueError(f"input, output and dead_letter must differ: {names}")
        return self


class StreamsConfig(BaseModel):
    """Live knobs of the stream consumer; no streams, no reader (and no Redis connection)."""

    model_config = ConfigDict(extra="forbid")

    streams: list[StreamSpec] = Field(default_factory=list, max_length=32)
    batch_size: int = Field(default=64, ge=1, le=1024)
    """Most messages read at once, and scored in one call to the traffic core."""
    block_ms: int = Field(default=1000, ge=1, le=60_000)
    """How long one read waits for new messages."""
    max_in_flight: int = Field(default=2, ge=1, le=64)
    """Batches of one stream being scored at once per replica. The next read waits for a free
    one, so a saturated graph slows reading instead of timing messages out."""
    claim_idle_s: float = Field(default=30.0, gt=0.0, le=86_400.0)
    """A message pending this long (its consumer died or hangs) is claimed by another replica
    (``XAUTOCLAIM``); keep it above the slowest batch's scoring time."""
    claim_interval_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """How often each replica looks for such messages."""
    max_attempts: int = Field(default=5, ge=1, le=100)
    """Scoring attempts of a batch that fails for a transient reason (a stage unavailable, a
    deadline); after the last one its messages go to the dead-letter stream."""
    retry_backoff_s: float = Field(default=0.5, gt=0.0, le=60.0)
    """Wait before the second attempt; doubled each time, at most 30 s."""
    max_deliveries: int = Field(default=10, ge=1, le=1000)
    """A claimed message delivered more often than this (it keeps killing its consumers) goes to
    the dead-letter stream instead of being scored again."""
    dedupe_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    """How long a message's idempotency key lives: a redelivery within it writes no second
    result."""
    output_max_len: int = Field(default=1_000_000, ge=0, le=1_000_000_000)
    """Approximate cap of the output and dead-letter streams (``XADD MAXLEN ~``); 0: no cap."""
    status_interval_s: float = Field(default=2.0, gt=0.0, le=300.0)
    """How often lag and pending are read into the metrics and each replica's heartbeat."""

    @model_validator(mode="after")
    def _unique_inputs(self) -> StreamsConfig:
        keys = [(s.input, s.group) for s in self.streams]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a stream is listed twice for one group: {keys}")
        return self
