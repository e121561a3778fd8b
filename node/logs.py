"""Logging set-up: identifiers through a contextvar, never patient data.

Log lines carry study/series UIDs and job ids (via `log_context`), calling AE
titles and peer addresses. pynetdicom's own dataset dumps are switched off
because they would print patient attributes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator

_context: contextvars.ContextVar[str] = contextvars.ContextVar("migraine_node_log_context", default="")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        record.ctx = f" [{ctx}]" if ctx else ""
        return True


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Attach identifiers (job=…, series=…) to every log line in this block."""
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    token = _context.set(f"{_context.get()} {text}".strip())
    try:
        yield
    finally:
        _context.reset(token)


def setup_logging(level: str = "INFO") -> None:
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s%(ctx)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom at INFO logs every PDU; its warnings and errors still show.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
