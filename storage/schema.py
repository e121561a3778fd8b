"""The job database's schema version: Alembic migrations (storage/migrations/), checked at start-up.

An empty database is created at the newest revision (create_all, then stamped: the migration chain
is tested to produce the same schema). A database at another revision is refused with what to do:
older ones need `migraine-node db upgrade` (an explicit step, so an administrator backs up first);
newer ones were made by a newer release. Release 0.1.0 made its tables without Alembic: a database
with our tables but no alembic_version is taken to be revision 0001.

Schema changes hold a lock (PostgreSQL: an advisory lock; SQLite: the write lock) so that several
processes starting at once against an empty database create it once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from storage.models import Base

# Alembic says "Context impl SQLiteImpl" at INFO each time a process opens the database: noise in
# the node's log. `db upgrade` prints what it did itself.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
UNVERSIONED_REVISION = "0001"
"""What a database with our tables and no alembic_version is: release 0.1.0's create_all."""
ADVISORY_LOCK_KEY = 0x6D69_6772  # "migr": PostgreSQL advisory lock held while the schema changes


class SchemaError(Exception):
    """The database's schema is not the one this release runs on; the message says what to do."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    """The database's revision; None when it has no tables of ours (empty) ."""
    head: str
    """The revision this release runs on."""
    versioned: bool
    """False for a release-0.1.0 database (tables but no alembic_version)."""

    @property
    def empty(self) -> bool:
        return self.current is None


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    return _script().get_current_head()


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def _state(conn: Connection) -> SchemaState:
    head = head_revision()
    current = MigrationContext.configure(conn).get_current_revision()
    if current is not None:
        return SchemaState(current, head, True)
    tables = set(inspect(conn).get_table_names())
    if "series" in tables:
        return SchemaState(UNVERSIONED_REVISION, head, False)
    return SchemaState(None, head, True)


def schema_state(engine: Engine) -> SchemaState:
    with engine.connect() as conn:
        return _state(conn)


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    """A write transaction that no other process changing the schema runs beside."""
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (storage/db.py), the database's write lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        yield conn


def describe_mismatch(state: SchemaState, url: str) -> str:
    where = f"the database {url}"
    if state.current in known_revisions():
        made_by = "release 0.1.0 (before schema versions)" if not state.versioned else f"schema revision {state.current}"
        return (f"{where} has {made_by}; this release runs on revision {state.head}. Back up the database, then run "
                "`migraine-node db upgrade` (with the same --config)")
    return (f"{where} has schema revision {state.current}, which this release does not know: it was made by a newer "
            f"release of migraine-node (this one runs on revision {state.head}). Run that release, or restore a backup "
            "made before its upgrade")


def ensure_schema(engine: Engine, url: str) -> SchemaState:
    """Create an empty database at the newest revision; refuse any other revision (SchemaError)."""
    state = schema_state(engine)
    if state.current == state.head:
        return state
    if not state.empty:
        raise SchemaError(describe_mismatch(state, url))
    with _schema_lock(engine) as conn:
        state = _state(conn)  # another process may have created it while we waited for the lock
        if state.empty:
            Base.metadata.create_all(conn)
            MigrationContext.configure(conn).stamp(_script(), "head")
            return SchemaState(state.head, state.head, True)
    if state.current != state.head:
        raise SchemaError(describe_mismatch(state, url))
    return state


def upgrade(engine: Engine, url: str) -> tuple[str | None, str]:
    """`migraine-node db upgrade`: migrate to the newest revision; returns (from, to)."""
    with _schema_lock(engine) as conn:
        state = _state(conn)
        if state.current is not None and state.current not in known_revisions():
            raise SchemaError(describe_mismatch(state, url))
        if state.empty:
            Base.metadata.create_all(conn)
            MigrationContext.configure(conn).stamp(_script(), "head")
            return None, state.head
        if not state.versioned:
            MigrationContext.configure(conn).stamp(_script(), UNVERSIONED_REVISION)
        if state.current != state.head:
            command.upgrade(_config(conn), "head")
        return state.current, state.head
