"""Selection stage: a complete series becomes `queued` (3D T1) or `skipped`.

Runs on the node's scheduler (never on an association thread); reads the
header of one spooled file, counts the series' instances, and applies the pure
rules of node/selection.py.
"""

from __future__ import annotations

import dataclasses
import logging

import pydicom

from node.logs import log_context
from node.selection import SelectionRules, header_from_datasets, select_series
from storage.jobs import JobQueue
from storage.spool import Spool

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, queue: JobQueue, spool: Spool, rules: SelectionRules | None = None) -> None:
        self.queue = queue
        self.spool = spool
        self.rules = rules or SelectionRules()

    def run(self) -> int:
        """Select every job awaiting selection; returns how many were handled."""
        handled = 0
        for job_id, series_uid in self.queue.awaiting_selection():
            with log_context(job=job_id, series=series_uid):
                try:
                    paths = self.queue.instance_paths(series_uid)
                    if not paths:
                        raise ValueError("no instances recorded")
                    # One header speaks for the series (protocol, geometry); the slice
                    # count comes from the rows (a multi-frame object counts its frames).
                    first = pydicom.dcmread(self.spool.root / paths[0], stop_before_pixels=True)
                    header = header_from_datasets([first])
                    if len(paths) > 1:
                        header = dataclasses.replace(header, slices=header.slices * len(paths))
                    decision = select_series(header, self.rules)
                except Exception as exc:  # an unreadable spool file must not stop the stage
                    self.queue.selected(job_id, False, f"cannot read the series headers: {exc}")
                    log.error("selection could not read the series: %s", exc)
                else:
                    self.queue.selected(job_id, decision.accepted, decision.reason)
                    log.info("%s: %s", "queued" if decision.accepted else "skipped", decision.reason)
            handled += 1
        return handled
