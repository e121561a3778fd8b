"""A real PostgreSQL server for tests: Debian's binaries, a temporary data directory, a free loopback
port, started and stopped by PID. As root (CI), the server runs as the `postgres` system user: it
refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import free_port, wait_until


def postgres_bin() -> Path | None:
    """The newest installed server's bin/ (postgresql-NN from Debian), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "postgres.log"

    @classmethod
    def start_new(cls) -> PostgresServer:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (apt: postgresql)")
        root = Path(tempfile.mkdtemp(prefix="migraine-pg-"))
        server = cls(bin_dir, root, free_port())
        server._initdb()
        server._run()
        return server

    def _as_server_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _initdb(self) -> None:
        data = self.root / "data"
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        subprocess.run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, timeout=120,
                       cwd=self.root, **self._as_server_user())

    def _run(self) -> None:
        # fsync off: a test server's durability is not under test (the node's spool fsyncs are).
        args = [str(self.bin_dir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         **self._as_server_user())

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                  capture_output=True).returncode == 0

        wait_until(ready, timeout=60, what="PostgreSQL to accept connections")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _children_of_data_dir(self.root):
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)


def _children_of_data_dir(root: Path) -> list[int]:
    """PIDs of processes still running from this server's data directory (must be none after stop)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(root) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids
