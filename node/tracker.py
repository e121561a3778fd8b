"""Series completion: decides when a series has all its instances.

A series in `receiving` becomes `complete` when
  (a) it holds the expected number of instances (Images in Acquisition, or one
      multi-frame object carrying the whole series) and no association that
      sent it is still open, or
  (b) its instance count is unknown and no instance arrived for `idle_seconds`, or
  (c) `max_wait_seconds` passed since its first instance.
A series whose expected count is known but not reached is never judged by the
idle rule: at `max_wait_seconds` it ends `incomplete` (never classified) with
the count in its reason; the missing instances reopen it as a new version.
`completion_reason` is the pure rule; `SeriesTracker` applies it on an
APScheduler tick and when a sender's association ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node.config import SeriesSection
from node.logs import log_context
from storage.models import SeriesState
from storage.store import JobStore, SeriesSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """The tracker's verdict on a receiving series: `complete` or `incomplete`, and why."""

    state: SeriesState
    reason: str

    @property
    def complete(self) -> bool:
        return self.state == SeriesState.COMPLETE


def completion_reason(
    series: SeriesSnapshot,
    now: float,
    idle_seconds: float,
    max_wait_seconds: float,
    sender_active: bool,
) -> Completion | None:
    """Whether `series` is done receiving now (complete or incomplete), or None to keep waiting."""
    expected = series.expected_instances
    waited = now - series.first_received_at
    if expected and series.instances >= expected:
        if not sender_active:
            return Completion(
                SeriesState.COMPLETE,
                f"expected instance count reached ({series.instances}/{expected}) and sender released",
            )
        if now - series.last_received_at >= idle_seconds:
            return Completion(SeriesState.COMPLETE, f"expected instance count reached ({series.instances}/{expected})"
                              f" and idle for {idle_seconds:g} s")
    elif expected:
        # A known count that is not reached: a pause is not the end of the series.
        if waited >= max_wait_seconds:
            return Completion(
                SeriesState.INCOMPLETE,
                f"{series.instances} of {expected} expected instances after {waited:.0f} s",
            )
        return None
    elif now - series.last_received_at >= idle_seconds:
        return Completion(SeriesState.COMPLETE, f"idle for {idle_seconds:g} s")
    if waited >= max_wait_seconds:
        return Completion(SeriesState.COMPLETE, f"max wait of {max_wait_seconds:g} s reached")
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
        """Close every receiving series that satisfies a rule (complete or incomplete); returns their UIDs."""
        wanted = set(only) if only is not None else None
        completed = []
        for snapshot in self.store.receiving_series():
            uid = snapshot.series_instance_uid
            if wanted is not None and uid not in wanted:
                continue
            verdict = completion_reason(
                snapshot,
                time.time() if now is None else now,
                self.idle_seconds,
                self.max_wait_seconds,
                self.sender_active(uid),
            )
            if verdict and self.store.mark_complete(snapshot, verdict.reason, state=verdict.state):
                with log_context(series=uid):
                    if verdict.complete:
                        log.info("series complete with %d instances: %s", snapshot.instances, verdict.reason)
                    else:
                        log.warning("series incomplete, not classified: %s", verdict.reason)
                completed.append(uid)
        return completed

    def association_ended(self, series_instance_uids: Iterable[str]) -> None:
        """A sender released: series that reached their expected count complete now."""
        try:
            self.tick(only=series_instance_uids)
        except Exception:
            log.exception("completion check after association end failed; the next tick retries")
