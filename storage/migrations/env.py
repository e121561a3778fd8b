"""Alembic environment: always run by storage/schema.py on a connection it opened (never from an
alembic.ini), so the node's own engine settings (SQLite WAL, busy timeout) apply to migrations too."""

from alembic import context

from storage.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
