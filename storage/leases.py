"""Who holds a job or a delivery: "host:pid" lease owners, and whether such an owner has ended.

Shared by the job queue (storage/jobs.py) and the delivery queue (storage/deliveries.py): a claim
records its owner, start-up recovery releases what this host's dead processes held, and only those.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def process_identity(pid: int | None = None) -> str:
    """"host:pid": who holds a job or a delivery (lease_owner); unique across the machines sharing
    one database."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def claimed_by(owner: str) -> str:
    """The reason a job carries while the process `owner` ("host:pid") holds it."""
    host, _, pid = owner.rpartition(":")
    return f"classifying in worker process {pid} on {host}"


def pid_alive(pid: int) -> bool:
    """Running: a zombie (killed, not yet reaped by whoever inherited it) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        stat = ""
    if stat:
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_from_this_host(owner: str | None, host: str) -> bool:
    """Whether the lease owner "host:pid" is a process of this host that has ended."""
    if owner is None:
        return False
    owner_host, _, pid = owner.rpartition(":")
    return owner_host == host and pid.isdigit() and not pid_alive(int(pid))


DEFAULT_LEASE_SECONDS = 60.0


def now_or(now: float | None) -> float:
    return time.time() if now is None else now
