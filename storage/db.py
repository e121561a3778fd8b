"""One SQLAlchemy engine per process, configured for many writer threads.

SQLite runs in WAL mode with a busy timeout. Write transactions
(`engine.begin()`, and JobStore's raw ingest path) start with BEGIN IMMEDIATE
so two writers queue on the lock instead of failing when a read transaction
tries to upgrade. Read transactions (`engine.connect()`) start with a plain
deferred BEGIN: under WAL they read a snapshot without taking the write lock,
so `jobs`, `status` and the scheduler's polls never hold up a C-STORE.
Consequently nothing may write inside `engine.connect()`: use `engine.begin()`.
synchronous=NORMAL is enough: the fsynced
spool file is the source of truth and rows lost to a power cut are rebuilt
from the spool at start-up (node/recovery.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from storage.schema import ensure_schema

BUSY_TIMEOUT_MS = 30_000

BEGIN_MODE_OPTION = "sqlite_begin_mode"
"""Connection execution option naming how the next transaction begins (DEFERRED or IMMEDIATE)."""


def _set_wal(cur) -> None:  # noqa: ANN001
    """PRAGMA journal_mode=WAL, retried while another connection holds the lock: switching a new
    database to WAL answers "database is locked" at once, without the busy timeout, when several
    processes open it at the same moment."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def make_engine(url: str, check_schema: bool = True) -> Engine:
    """Create the engine for `url`; an empty database gets the newest schema.

    With `check_schema`, a database at another schema revision raises
    storage.schema.SchemaError (`migraine-node db upgrade` passes False).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_engine(
            url,
            connect_args={"isolation_level": None, "timeout": BUSY_TIMEOUT_MS / 1000},
            pool_size=8,
            max_overflow=32,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            _set_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # noqa: ANN001
            # Reads (autobegin under engine.connect()) take a deferred snapshot; writes ask for IMMEDIATE.
            mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        @contextlib.contextmanager
        def _begin_immediate() -> Iterator[Connection]:
            """`engine.begin()`: a write transaction, holding the write lock from its start."""
            with engine.connect() as conn:
                conn.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"})
                with conn.begin():
                    yield conn

        engine.begin = _begin_immediate  # type: ignore[method-assign]
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=32)
    if check_schema:
        try:
            ensure_schema(engine, engine.url.render_as_string(hide_password=True))
        except BaseException:
            engine.dispose()
            raise
    return engine
