"""The controller's durable desired state (SQLite, WAL): desired rules and blocks.

What the core decides to keep (``Step.persist`` / ``Step.persist_blocks``) is written
here before the next step is carried out, and read back at start, before the daemon
listens (``ControllerCore.restore``). So a controller killed with SIGKILL comes back
with the operator's rules and the blocked sources, and every agent's resync gets them.

- One row per desired rule and scope (``''`` is the template, what agents not seen yet
  get; otherwise an agent id), in install order: the tables are stored as they stand
  after the operator's mods, which is what the agents had. A scope's rows are replaced
  together, in one transaction.
- Times are unix seconds here (the core's are monotonic, per process): the shell passes
  ``wall_offset`` = time.time() - time.monotonic(). A hard timeout runs from
  ``installed_at`` whatever happens to the process; ``hard_deadline`` and
  ``expires_at`` are there for people reading the file.
- It lives in the journal's SQLite file (one file to keep), on a connection of its own
  used only by the event loop. Writes are small and rare (operator mods, blocks,
  expiries, reloads) and run synchronously: a ModRules is answered after its rule is
  stored. WAL with synchronous=NORMAL: a commit survives the process being killed; a
  power cut may lose the last ones.

It is kept apart from controller/journal.py: the journal is an append-only log written
in batches off the loop; this is current state, replaced in place and written at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import json_format

from controller.desired import DesiredState, StoredRule
from openexample.v1 import openexample_pb2 as pb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS desired_scopes (
    scope TEXT PRIMARY KEY        -- '' the template (agents not seen yet), else an agent id
);
CREATE TABLE IF NOT EXISTS desired_rules (
    scope TEXT NOT NULL,
    position INTEGER NOT NULL,    -- install order (among equal priorities, first wins)
    installed_at REAL NOT NULL,   -- unix seconds: the hard timeout runs from here
    hard_deadline REAL,           -- unix seconds, NULL: none (installed_at + hard timeout)
    mod TEXT NOT NULL,            -- the ADD (VigilanceMod as JSON, proto field names)
    PRIMARY KEY (scope, position)
);
CREATE TABLE IF NOT EXISTS blocks (
    agent_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    expires_at REAL,              -- unix seconds, NULL: never
    PRIMARY KEY (agent_id, source_id)
);
"""


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One thread uses it (the event loop); the check is off so close() may run anywhere.
        self._db = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            self._db.executescript(_SCHEMA)

    def load(self, wall_offset: float) -> DesiredState:
        """What was stored, in the core's time (unix time - ``wall_offset``). Raises
        sqlite3.Error, or ValueError for a row that does not parse."""
        state = DesiredState()
        for (scope,) in self._db.execute("SELECT scope FROM desired_scopes ORDER BY scope"):
            state.tables[scope] = []
        rows = self._db.execute(
            "SELECT scope, position, installed_at, mod FROM desired_rules ORDER BY scope, position"
        )
        for scope, position, installed_at, text in rows:
            try:
                mod = json_format.Parse(text, pb.VigilanceMod())
            except json_format.ParseError as exc:
                raise ValueError(f"desired_rules {scope!r} #{position}: {exc}") from None
            state.tables.setdefault(scope, []).append(StoredRule(mod, installed_at - wall_offset))
        for agent_id, source_id, expires_at in self._db.execute(
            "SELECT agent_id, source_id, expires_at FROM blocks"
        ):
            until = 0.0  # never
            if expires_at is not None:
                # (0.0 in the core means never: an expiry that lands on it exactly is over)
                until = (expires_at - wall_offset) or -1.0
            state.blocks[(agent_id, source_id)] = until
        return state

    def write(
        self,
        tables: Mapping[str, list[StoredRule] | None],
        blocks: Mapping[tuple[str, str], float] | None,
        wall_offset: float,
    ) -> None:
        """Replace the given scopes (None: the scope is gone) and, unless ``blocks`` is
        None, the blocked sources, in one transaction. Times in the core's time."""
        with self._db:
            for scope, stored in tables.items():
                self._db.execute("DELETE FROM desired_rules WHERE scope = ?", (scope,))
                if stored is None:
                    self._db.execute("DELETE FROM desired_scopes WHERE scope = ?", (scope,))
                    continue
                self._db.execute("INSERT OR IGNORE INTO desired_scopes VALUES (?)", (scope,))
                self._db.executemany(
                    "INSERT INTO desired_rules (scope, position, installed_at, hard_deadline,"
                    " mod) VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            scope,
                            i,
                            r.installed_at + wall_offset,
                            r.installed_at + wall_offset + r.mod.hard_timeout_s
                            if r.mod.hard_timeout_s
                            else None,
                            json_format.MessageToJson(
                                r.mod, preserving_proto_field_name=True, indent=None
                            ),
                        )
                        for i, r in enumerate(stored)
                    ],
                )
            if blocks is not None:
                self._db.execute("DELETE FROM blocks")
                self._db.executemany(
                    "INSERT INTO blocks (agent_id, source_id, expires_at) VALUES (?, ?, ?)",
                    [
                        (agent_id, source_id, until + wall_offset if until else None)
                        for (agent_id, source_id), until in blocks.items()
                    ],
                )

    def write_all(self, state: DesiredState, wall_offset: float) -> None:
        """Everything in ``state``, replacing what was stored."""
        with self._db:
            self._db.execute("DELETE FROM desired_rules")
            self._db.execute("DELETE FROM desired_scopes")
        self.write(state.tables, state.blocks, wall_offset)

    def close(self) -> None:
        self._db.close()
