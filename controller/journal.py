"""Durable incident journal (SQLite by default): what was caught, never the input.

Writes are batched and run off the event loop (``flush`` in a worker thread), so a
burst of adversarial verdicts costs the hot path one list append each.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

from controller.core import Incident

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,            -- unix seconds
    agent_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    label INTEGER NOT NULL,
    corrected_label INTEGER,
    score REAL NOT NULL,
    evidence TEXT NOT NULL       -- JSON, per detector
);
CREATE INDEX IF NOT EXISTS incidents_at ON incidents(at);
CREATE INDEX IF NOT EXISTS incidents_source ON incidents(source_id);
CREATE TABLE IF NOT EXISTS admin_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,            -- unix seconds
    who TEXT NOT NULL,           -- the operator's certificate identity, or "plaintext"
    method TEXT NOT NULL,        -- ModRules, ...
    request TEXT NOT NULL,       -- JSON of the request
    outcome TEXT NOT NULL        -- "ok", "refused: ...", "denied: ..."
);
"""


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._pending: list[Incident] = []
        self._lock = threading.Lock()

    def record(self, incidents: list[Incident], wall_offset_s: float = 0.0) -> None:
        """Queue incidents for the next flush. The core stamps them with its monotonic
        ``now``; ``wall_offset_s`` (time.time() - time.monotonic()) makes them unix times."""
        if wall_offset_s:
            incidents = [dataclasses.replace(i, at=i.at + wall_offset_s) for i in incidents]
        with self._lock:
            self._pending.extend(incidents)

    def flush(self) -> int:
        """Write what was recorded; returns how many rows."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        rows = [
            (
                i.at,
                i.agent_id,
                i.model_id,
                i.source_id,
                i.label,
                i.corrected_label,
                i.score,
                i.evidence,
            )
            for i in batch
        ]
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO incidents (at, agent_id, model_id, source_id, label,"
                " corrected_label, score, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def recent(self, limit: int = 100) -> list[dict]:
        with self._lock:
            cur = self._db.execute(
                "SELECT at, agent_id, model_id, source_id, label, corrected_label, score,"
                " evidence FROM incidents ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def record_admin(self, at: float, who: str, method: str, request: str, outcome: str) -> None:
        """One admin call that changes (or tried to change) state: written at once."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO admin_changes (at, who, method, request, outcome)"
                " VALUES (?, ?, ?, ?, ?)",
                (at, who, method, request, outcome),
            )

    def admin_changes(self, limit: int = 100) -> list[dict]:
        with self._lock:
            cur = self._db.execute(
                "SELECT at, who, method, request, outcome FROM admin_changes"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM incidents").fetchone()[0]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
