"""The prediction log: a sample of answered texts as rotated JSON-lines files, for offline analysis.

One record per text (see :func:`records`): time, request id, A/B variant, the text raw, hashed or
left out (:class:`PredictionLogConfig`), label, every label's probability, the model versions,
the request's latency and whether it was cached or degraded. The monitor deployment writes them
off the response path; this module is plain Python.

Files are ``<folder>/predictions-<writer>-<opened>-<seq>.jsonl``. A file is written as
``….jsonl.part`` and renamed when it rotates (``rotate_records`` records or ``rotate_s`` seconds),
so readers never see half a line. Read every closed file with Ray Data::

    ray.data.read_json("/path/to/predictions", file_extensions=["jsonl"])
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

PART = ".part"


class PredictionLogConfig(BaseModel):
    """Live knobs of the prediction log (part of the monitor's ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    text: Literal["raw", "hash", "omit"] = "hash"
    """``hash`` stores ``text_hash`` (SHA-256, or HMAC-SHA256 when a key is set) instead of the
    text: equal texts can still be counted and joined, but not read."""
    rotate_records: int = Field(default=10_000, ge=1, le=10_000_000)
    rotate_s: float = Field(default=300.0, gt=0.0, le=86_400.0)
    keep_files: int = Field(default=500, ge=1, le=1_000_000)
    """Closed files kept per writer; the oldest are deleted beyond this."""


def text_hash(text: str, key: bytes | None) -> str:
    if key:
        return "hmac-sha256:" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def records(
    texts: Sequence[str],
    labels: Sequence[str],
    probabilities: Sequence[Sequence[float]],
    cached: Sequence[bool],
    *,
    label_names: Sequence[str],
    models: dict[str, str],
    variant: str,
    request_id: str,
    latency_ms: float,
    degraded: bool,
    at: float | None = None,
) -> list[dict[str, Any]]:
    """One record per text of an answer; ``models`` maps stage to ``name/version``."""
    at = time.time() if at is None else at
    return [
        {
            "ts": at,
            "request_id": request_id,
            "variant": variant,
            "text": text,
            "label": label,
            "probabilities": dict(zip(label_names, (float(p) for p in row), strict=True)),
            "models": models,
            "latency_ms": latency_ms,
            "cached": bool(hit),
            "degraded": degraded,
        }
        for text, label, row, hit in zip(texts, labels, probabilities, cached, strict=True)
    ]


class PredictionLog:
    """Appends records to the current file; rotates by size and age. Thread-safe."""

    def __init__(self, folder: Path, writer: str, key: bytes | None = None) -> None:
        self.folder = folder
        self.writer = "".join(c if c.isalnum() or c in "-_" else "_" for c in writer)
        self.key = key
        self.config = PredictionLogConfig()
        self._lock = threading.Lock()
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._count = 0
        self._seq = 0
        self.written = 0

    def configure(self, config: PredictionLogConfig) -> None:
        with self._lock:
            self.config = config
            if not config.enabled:
                self._close()

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._opened = time.time()
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._opened))
        self._path = self.folder / f"predictions-{self.writer}-{stamp}-{self._seq:06d}.jsonl{PART}"
        self._file = self._path.open("w", encoding="utf-8")
        self._count = 0

    def _close(self) -> Path | None:
        if self._file is None or self._path is None:
            return None
        self._file.close()
        self._file = None
        closed: Path | None = self._path.with_name(self._path.name.removesuffix(PART))
        if self._count and closed is not None:
            self._path.rename(closed)
        else:
            self._path.unlink(missing_ok=True)
            closed = None
        self._path = None
        self._prune()
        return closed

    def _prune(self) -> None:
        done = sorted(self.folder.glob(f"predictions-{self.writer}-*.jsonl"))
        for old in done[: max(0, len(done) - self.config.keep_files)]:
            old.unlink(missing_ok=True)

    def _shape(self, record: dict[str, Any]) -> dict[str, Any]:
        mode = self.config.text
        out = dict(record)
        text = out.pop("text")
        if mode == "raw":
            out["text"] = text
        elif mode == "hash":
            out["text_hash"] = text_hash(text, self.key)
        return out

    def write(self, batch: Sequence[dict[str, Any]]) -> int:
        """Append ``batch``; returns how many records were written (0 while disabled)."""
        with self._lock:
            if not self.config.enabled or not batch:
                return 0
            if self._file is None:
                self._open()
            lines = "".join(json.dumps(self._shape(r), separators=(",", ":")) + "\n" for r in batch)
            self._file.write(lines)
            self._file.flush()
            self._count += len(batch)
            self.written += len(batch)
            if self._count >= self.config.rotate_records:
                self._close()
            return len(batch)

    def rotate(self, force: bool = False) -> Path | None:
        """Close the current file if it is due (or ``force``); returns the closed file."""
        with self._lock:
            if self._file is None:
                return None
            if force or time.time() - self._opened >= self.config.rotate_s:
                return self._close()
            return None

    def close(self) -> None:
        with self._lock:
            self._close()
