"""Alembic migrations of the job database (SQLite and PostgreSQL); see storage/schema.py."""
