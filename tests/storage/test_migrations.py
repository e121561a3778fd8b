"""Alembic migrations: a release-0.1.0 database upgrades with its data, the migration chain builds
exactly the schema of the models, and start-up refuses a database at another revision."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from storage.db import make_engine, sqlite_url
from storage.jobs import JobQueue
from storage.models import Base
from storage.schema import SchemaError, head_revision, schema_state, upgrade
from storage.store import JobStore

RELEASE_0_1_0 = Path(__file__).with_name("data") / "release-0.1.0.sql"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


def _differences(engine) -> list:  # noqa: ANN001
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def _release_0_1_0_sqlite(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        conn.executescript(RELEASE_0_1_0.read_text())
    return sqlite_url(path)


def test_a_release_0_1_0_database_is_refused_then_upgraded_with_its_history(tmp_path):
    url = _release_0_1_0_sqlite(tmp_path / "node.db")
    with pytest.raises(SchemaError, match=r"release 0\.1\.0 .*migraine-node db upgrade"):
        make_engine(url)
    engine = make_engine(url, check_schema=False)
    assert upgrade(engine, url) == ("0001", head_revision())
    assert _differences(engine) == []
    engine.dispose()
    engine = make_engine(url)  # now accepted
    view = JobStore(engine).get_series(SERIES)
    assert view.state == "delivered" and view.probability == pytest.approx(0.7) and view.instances == 3
    assert [j["state"] for j in view.jobs] == ["delivered"] and len(view.sent_objects) == 1
    assert view.purged_at is None and view.jobs[0]["lease_owner"] is None
    # The upgraded database works for the node: a replay queues, claims and leases.
    queue = JobQueue(engine)
    queue.replay(SERIES)
    ((job_id, _),) = queue.awaiting_selection()
    queue.selected(job_id, True, "3D T1")
    claimed = queue.claim()
    assert claimed.job_id == job_id and queue.heartbeat(job_id)
    engine.dispose()
    engine = make_engine(url, check_schema=False)
    assert upgrade(engine, url) == (head_revision(), head_revision())
    engine.dispose()


def test_the_migration_chain_builds_the_models_schema(database_url):
    """Upgrading an empty database revision by revision (as a site upgrading from 0.1.0 does) ends
    with exactly the schema a new database gets from the models."""
    from alembic import command

    from storage.schema import _config

    engine = create_engine(database_url)
    with engine.begin() as conn:
        command.upgrade(_config(conn), "0001")
    assert schema_state(engine).current == "0001"
    with engine.begin() as conn:
        command.upgrade(_config(conn), "head")
    assert _differences(engine) == []
    assert schema_state(engine).current == head_revision()
    engine.dispose()
    fresh = make_engine(database_url.replace("node.db", "fresh.db")) if "sqlite" in database_url else None
    if fresh is not None:
        assert _differences(fresh) == []
        fresh.dispose()


def test_a_newer_schema_is_refused_and_never_downgraded(database_url):
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="newer release"):
        make_engine(database_url)
    unchecked = make_engine(database_url, check_schema=False)
    with pytest.raises(SchemaError, match="newer release"):
        upgrade(unchecked, database_url)
    unchecked.dispose()
    engine.dispose()


def test_processes_starting_together_on_an_empty_database_create_it_once(database_url):
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            make_engine(database_url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    engine = make_engine(database_url)
    assert _differences(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()
