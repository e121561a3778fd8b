"""Real peers for tests: the node as a subprocess, DCMTK tools, free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE = "MIGNODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def storescu(
    paths: list[Path] | Path,
    port: int,
    calling: str = "SCANNER",
    called: str = NODE_AE,
    extra: tuple[str, ...] = (),
    verbose: bool = False,
) -> subprocess.CompletedProcess:
    targets = [str(paths)] if isinstance(paths, Path) else [str(p) for p in paths]
    scan = ("+sd",) if isinstance(paths, Path) and paths.is_dir() else ()
    return subprocess.run(
        [STORESCU, *(("-v",) if verbose else ()), *extra, "-aet", calling, "-aec", called,
         "127.0.0.1", str(port), *scan, *targets],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class NodeProcess:
    """`migraine-node serve` in a subprocess, stopped by PID."""

    config: Path
    data_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @classmethod
    def write_config(
        cls,
        root: Path,
        idle_seconds: float = 2,
        max_wait_seconds: float = 600,
        allowed: list[str] | None = None,
        min_free_disk_mb: int = 16,
        port: int | None = None,
    ) -> NodeProcess:
        port = port or free_port()
        data_dir = root / "data"
        config = root / "node.toml"
        config.write_text(
            "[node]\n"
            f'ae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = {port}\nlog_level = "DEBUG"\n'
            f"allowed_calling_aets = {json.dumps(allowed or [])}\n"
            f'[storage]\ndata_dir = "{data_dir}"\nmin_free_disk_mb = {min_free_disk_mb}\n'
            f"[series]\nidle_seconds = {idle_seconds}\nmax_wait_seconds = {max_wait_seconds}\n"
        )
        return cls(config=config, data_dir=data_dir, port=port, log=root / "node.log")

    def start(self) -> NodeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRAINE_NODE_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(ready, timeout=60, what="node to listen")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def jobs(self) -> list[dict]:
        out = self.cli("jobs", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def spool_files(self) -> list[Path]:
        return sorted((self.data_dir / "spool").glob("*/*/*.dcm"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
