"""The job API's record (``/sdapi/v1/jobs``): every job submitted there, its state and, once done, its info and the
PNG files of its images, kept in SQLite in the data folder so the history survives a restart. A job the server
stopped before it ended is marked so at the next start."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled", "lost")
ENDED = ("done", "failed", "cancelled", "lost")


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str  # txt2img or img2img
    state: str
    created: float
    started: float | None
    finished: float | None
    info: str | None  # A1111's info JSON, once done
    images: list[Path]
    error: str | None
    field: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "created": self.created,
                "started": self.started, "finished": self.finished, "error": self.error, "field": self.field,
                "images": len(self.images)}


class JobHistory:
    """The jobs table, written from the queue's worker and read by the routes (one connection, one lock)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT, state TEXT, created REAL,
                            started REAL, finished REAL, info TEXT, images TEXT, error TEXT, field TEXT)""")
        with self._lock:  # what a stopped server left queued or running will not end any more
            self._db.execute("UPDATE jobs SET state = 'lost', finished = ?, error = ? WHERE state IN ('queued', "
                             "'running')", (time.time(), "the server stopped before the job ended"))

    def add(self, job_id: str, kind: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, kind, state, created, images) VALUES (?, ?, 'queued', ?, '[]')",
                             (job_id, kind, time.time()))

    def started(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ? AND state = 'queued'",
                             (time.time(), job_id))

    def ended(self, job_id: str, state: str, info: str | None = None, images: list[Path] = (),
              error: str | None = None, field: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state = ?, finished = ?, info = ?, images = ?, error = ?, field = ? "
                             "WHERE id = ?", (state, time.time(), info, json.dumps([str(p) for p in images]), error,
                                              field, job_id))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT id, kind, state, created, started, finished, info, images, error, field "
                                   "FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def recent(self, limit: int) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, state, created, started, finished, info, images, error, field "
                                    "FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_record(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple) -> JobRecord:
    *head, images, error, field = row
    return JobRecord(*head, [Path(p) for p in json.loads(images or "[]")], error, field)
