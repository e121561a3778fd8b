"""Selection stage: a complete series becomes `queued` (3D T1) or `skipped`.

Runs on the node's scheduler (never on an association thread); reads the
header of one spooled file, counts the series' instances, and applies the pure
rules of node/selection.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pydicom
from sqlalchemy import select

from node.logs import log_context
from node.selection import SelectionRules, header_from_datasets, select_series
from storage.jobs import JobQueue
from storage.models import Job, SeriesState
from storage.spool import Spool
from storage.store import is_private_sop_class

log = logging.getLogger(__name__)


def selection_failed(queue: JobQueue, job_id: int, reason: str, now: float | None = None) -> None:
    """A job whose selection raised is `failed` with the reason (visible in `jobs`/`status`), never a skip.

    One transaction; a job superseded meanwhile is left alone. `replay` retries it.
    """
    now = time.time() if now is None else now
    with queue.engine.begin() as conn:
        state = conn.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
        if state != SeriesState.COMPLETE:
            return
        queue._set_state(conn, job_id, SeriesState.FAILED, now, reason=reason)  # noqa: SLF001 - same transitions


@dataclasses.dataclass(frozen=True)
class Selected:
    handled: int  # jobs judged: queued, skipped, or failed selection
    queued: int  # of those, jobs queued for a worker


class Dispatcher:
    def __init__(self, queue: JobQueue, spool: Spool, rules: SelectionRules | None = None) -> None:
        self.queue = queue
        self.spool = spool
        self.rules = rules or SelectionRules()

    def run(self) -> int:
        """Select every job awaiting selection; returns how many were handled (queued, skipped or failed)."""
        return self.select_all().handled

    def select_all(self) -> Selected:
        """Select every job awaiting selection; says how many were handled and how many of them were queued.

        A study brings 10-20 series of which about one is a 3D T1: only `queued` wakes a worker.
        """
        handled = queued = 0
        for job_id, series_uid in self.queue.awaiting_selection():
            with log_context(job=job_id, series=series_uid):
                try:
                    # Image instances only: vendor-private objects (Philips series data,
                    # ExamCards) are kept in the spool but never speak for the series.
                    paths = self.queue.instance_paths(series_uid)
                    if not paths:
                        raise ValueError("no image instances recorded (private vendor objects are not images)")
                    # One header speaks for the series (protocol, geometry, contrast agent); the
                    # slice count comes from the rows (a multi-frame object counts its frames).
                    first = pydicom.dcmread(self.spool.root / paths[0], stop_before_pixels=True)
                    if is_private_sop_class(str(first.get("SOPClassUID", ""))):
                        raise ValueError(f"{paths[0]} is a private vendor object, not an image")
                    header = header_from_datasets([first])
                    if len(paths) > 1:
                        header = dataclasses.replace(header, slices=header.slices * len(paths))
                    decision = select_series(header, self.rules)
                except Exception as exc:  # noqa: BLE001 - an unreadable spool file must not stop the stage
                    reason = f"selection failed: {type(exc).__name__}: {exc}"
                    selection_failed(self.queue, job_id, reason)
                    log.error("%s", reason)
                else:
                    self.queue.selected(job_id, decision.accepted, decision.reason)
                    queued += decision.accepted
                    log.info("%s: %s", "queued" if decision.accepted else "skipped", decision.reason)
            handled += 1
        return Selected(handled, queued)
