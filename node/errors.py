"""Error tree of the node.

    NodeError
    ├── ConfigError        bad configuration file, key or value
    ├── IngestError        a C-STORE that cannot be accepted (carries a DIMSE status)
    └── PeerError          a remote AE could not be reached or refused us

Third-party exceptions (pynetdicom, SQLAlchemy, OSError) are translated into
these where they enter our code.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses we return (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    """Stored durably and recorded."""
    OUT_OF_RESOURCES = 0xA700
    """Refused: disk below the free-space floor or the spool/database failed."""
    CANNOT_UNDERSTAND = 0xC210
    """The dataset could not be parsed."""
    MISSING_OR_INVALID_UID = 0xC211
    """Study, Series or SOP Instance UID missing or not a valid UID."""
    UID_MISMATCH = 0xC212
    """Dataset SOP Instance UID differs from the request, or a UID conflicts with earlier data."""


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Configuration is invalid; the message names the key."""


class IngestError(NodeError):
    def __init__(self, status: StoreStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class PeerError(NodeError):
    """A remote AE is unreachable, rejected the association or answered failure."""
