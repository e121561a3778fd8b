"""Selection stage: a complete series becomes `queued` (3D T1) or `skipped`.

Runs on the node's scheduler (never on an association thread); reads only the
headers of the spooled files and applies the pure rules of node/selection.py.
"""

from __future__ import annotations

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
                    datasets = [pydicom.dcmread(self.spool.root / p, stop_before_pixels=True) for p in paths]
                    if not datasets:
                        raise ValueError("no instances recorded")
                    decision = select_series(header_from_datasets(datasets), self.rules)
                except Exception as exc:  # an unreadable spool file must not stop the stage
                    self.queue.selected(job_id, False, f"cannot read the series headers: {exc}")
                    log.error("selection could not read the series: %s", exc)
                else:
                    self.queue.selected(job_id, decision.accepted, decision.reason)
                    log.info("%s: %s", "queued" if decision.accepted else "skipped", decision.reason)
            handled += 1
        return handled
