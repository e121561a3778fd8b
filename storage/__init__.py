"""Durable state of the node: spool files on disk and job state in SQL (SQLAlchemy)."""
