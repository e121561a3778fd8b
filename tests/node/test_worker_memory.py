"""node/worker.py memory habits: keep_freed_memory (a worker reuses the memory of the last series'
arrays instead of page-faulting fresh mappings for every series) and collector_paused (no cyclic
garbage collection inside a job; one when it ends)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Allocates and frees a 64 MB array (larger than glibc's largest mmap threshold, as a volume at the
# paper's size is); prints how much of it stays resident after the free, ready for the next series.
_PROBE = """
import json, os, sys
import numpy as np
sys.path.insert(0, {root!r})
from node.worker import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
a = np.ones(16 * 1024 * 1024, dtype=np.float32)
peak = resident()
del a
print(json.dumps({{"kept": kept, "released_mb": (peak - resident()) / 2**20}}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(ROOT)), mode], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_large_array_stays_in_the_heap_for_the_next_series():
    default = _probe("default")
    kept = _probe("keep")
    assert kept["kept"] is True
    assert default["released_mb"] > 60, default  # glibc's default: unmapped at once, faulted in again next time
    assert kept["released_mb"] < 4, kept  # kept in the heap: the next series' arrays reuse it


def test_no_garbage_collection_inside_a_job_and_its_cycles_freed_after():
    import gc
    import weakref

    from node.worker import collector_paused

    class Node:
        pass

    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        with collector_paused():
            assert not gc.isenabled()
            first = Node()
            first.me = first  # a cycle: only the collector frees it
            alive = weakref.ref(first)
            del first
            for _ in range(50_000):  # far past gen0's threshold (700 allocations)
                node = Node()
                node.me = node
            assert alive() is not None and collections == []
        assert gc.isenabled()
        assert alive() is None  # collected as the job ended
    finally:
        gc.callbacks.remove(count)
    gc.disable()  # a collector found off stays off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
