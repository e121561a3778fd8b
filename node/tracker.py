"""Series completion: decides when a series has all its instances.

A series in `receiving` becomes `complete` when
  (a) no instance arrived for `idle_seconds`, or
  (b) it holds the expected number of instances (Images in Acquisition, or one
      multi-frame object carrying the whole series) and no association that
      sent it is still open, or
  (c) `max_wait_seconds` passed since its first instance.
`completion_reason` is the pure rule; `SeriesTracker` applies it on an
APScheduler tick and when a sender's association ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from node.config import SeriesSection
from node.logs import log_context
from storage.store import JobStore, SeriesSnapshot

log = logging.getLogger(__name__)


def completion_reason(
    series: SeriesSnapshot,
    now: float,
    idle_seconds: float,
    max_wait_seconds: float,
    sender_active: bool,
) -> str | None:
    """Why `series` is complete now, or None if it is not."""
    expected = series.expected_instances
    if expected and series.instances >= expected and not sender_active:
        return f"expected instance count reached ({series.instances}/{expected}) and sender released"
    if now - series.last_received_at >= idle_seconds:
        return f"idle for {idle_seconds:g} s"
    if now - series.first_received_at >= max_wait_seconds:
        return f"max wait of {max_wait_seconds:g} s reached"
    return None


class SeriesTracker:
    def __init__(
        self,
        store: JobStore,
        series: SeriesSection,
        sender_active: Callable[[str], bool],
    ) -> None:
        self.store = store
        self.idle_seconds = series.idle_seconds
        self.max_wait_seconds = series.max_wait_seconds
        self.sender_active = sender_active

    def tick(self, now: float | None = None, only: Iterable[str] | None = None) -> list[str]:
        """Complete every receiving series that satisfies a rule; returns their UIDs."""
        wanted = set(only) if only is not None else None
        completed = []
        for snapshot in self.store.receiving_series():
            uid = snapshot.series_instance_uid
            if wanted is not None and uid not in wanted:
                continue
            reason = completion_reason(
                snapshot,
                time.time() if now is None else now,
                self.idle_seconds,
                self.max_wait_seconds,
                self.sender_active(uid),
            )
            if reason and self.store.mark_complete(snapshot, reason):
                with log_context(series=uid):
                    log.info("series complete with %d instances: %s", snapshot.instances, reason)
                completed.append(uid)
        return completed

    def association_ended(self, series_instance_uids: Iterable[str]) -> None:
        """A sender released: series that reached their expected count complete now."""
        try:
            self.tick(only=series_instance_uids)
        except Exception:
            log.exception("completion check after association end failed; the next tick retries")
