"""Real peers for tests: the node as a subprocess, DCMTK tools, free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.demo import free_port  # noqa: F401  (re-exported for tests and benchmarks)

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE = "MIGNODE"


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Run dicom3tools' dciodvfy on `path`: (its "Error" lines, its whole output)."""
    result = subprocess.run(["/usr/bin/dciodvfy", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=120)
    return [line for line in result.stdout.splitlines() if line.startswith("Error")], result.stdout


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


# ---- a pynetdicom SCU -------------------------------------------------------------------------

MAX_CONTEXTS = 128  # presentation contexts one association may propose


@contextmanager
def scu_association(
    port: int,
    calling: str = "SCANNER",
    called: str = NODE_AE,
    contexts: Sequence[str] | None = None,
    extra_contexts: Sequence[str] = (),
    transfer_syntax: str | None = None,
) -> Iterator:
    """An established association from a pynetdicom SCU to 127.0.0.1:`port`, released on exit.

    It proposes `contexts` (abstract syntax UIDs), by default pynetdicom's storage SOP classes
    (trimmed to leave room for `extra_contexts`, proposed after them), each with `transfer_syntax`
    alone or pynetdicom's default transfer syntaxes.
    """
    from pynetdicom import AE, StoragePresentationContexts

    if contexts is None:
        storage = [cx.abstract_syntax for cx in StoragePresentationContexts]
        contexts = storage[: MAX_CONTEXTS - len(extra_contexts)]
    ae = AE(ae_title=calling)
    for uid in [*contexts, *extra_contexts]:
        ae.add_requested_context(uid, [transfer_syntax] if transfer_syntax else None)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def scu_store_responses(port: int, *datasets_or_paths, chunked: bool = True, **association) -> list:
    """C-STORE each dataset or file over one association (`scu_association`'s keywords); the responses.

    `chunked`: files go as they are on disk, never decoded, so malformed ones reach the node
    (pynetdicom's STORE_SEND_CHUNKED_DATASET, put back afterwards); otherwise pynetdicom reads them.
    """
    from pynetdicom import _config as pynetdicom_config

    with scu_association(port, **association) as assoc:
        saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        try:
            return [assoc.send_c_store(item) for item in datasets_or_paths]
        finally:
            pynetdicom_config.STORE_SEND_CHUNKED_DATASET = saved


def scu_store(port: int, *datasets_or_paths, chunked: bool = True, **association) -> list[int]:
    """`scu_store_responses`, the statuses only."""
    return [rsp.Status for rsp in scu_store_responses(port, *datasets_or_paths, chunked=chunked, **association)]


def scu_echo(port: int, calling: str = "SCANNER", called: str = NODE_AE) -> int:
    """A C-ECHO over its own association; the status."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    with scu_association(port, calling=calling, called=called, contexts=[Verification]) as assoc:
        return assoc.send_c_echo().Status


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
        workers: int = 0,
        checkpoint: Path | None = None,
        destinations: list[dict] | None = None,
        export_retry_seconds: float = 1,
        runtime: str | None = None,
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
            f"[worker]\nprocesses = {workers}\nretry_seconds = 1\n"
            f"[export]\nretry_initial_seconds = {export_retry_seconds}\nretry_max_seconds = {max(export_retry_seconds, 2)}\n"
            + (f'[model]\ncheckpoint = "{checkpoint}"\ndevice = "cpu"\n' if checkpoint else "")
            + (("" if checkpoint else "[model]\n") + f'runtime = "{runtime}"\n' if runtime else "")
            + "".join(
                f'[[destinations]]\nname = "{d["name"]}"\nae_title = "{d["ae_title"]}"\nhost = "127.0.0.1"\nport = {d["port"]}\n'
                + (f"objects = {json.dumps(d['objects'])}\n" if "objects" in d else "")
                for d in destinations or []
            )
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


ORTHANC = "/usr/sbin/Orthanc"


@dataclass
class OrthancProcess:
    """A real Orthanc (Debian package) on loopback ports, stopped by PID."""

    root: Path
    dicom_port: int
    http_port: int
    aet: str = "ORTHANC"
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, root: Path, modalities: dict[str, tuple[str, int]] | None = None,
               dicomweb: bool = False) -> OrthancProcess:
        """`dicomweb=True` loads Debian's orthanc-dicomweb plugin (DICOMweb at /dicom-web/, for OHIF)."""
        root.mkdir(parents=True, exist_ok=True)
        self = cls(root, free_port(), free_port())
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in (modalities or {}).items()},
            "Plugins": [],
            "StableAge": 2,
        }
        if dicomweb:
            from node.viewer import orthanc_dicomweb_config, orthanc_dicomweb_plugin

            plugin = orthanc_dicomweb_plugin()
            if plugin is None:
                raise AssertionError("Orthanc's DICOMweb plugin is not installed: "
                                     "apt-get install orthanc-dicomweb (part of `make install-test`)")
            config["Plugins"] = [plugin]
            config["DicomWeb"] = orthanc_dicomweb_config()
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        return self

    def start(self) -> OrthancProcess:
        with (self.root / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=log,
                                         stderr=subprocess.STDOUT, env=DCMTK_ENV)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                return self.get("/system")["DicomAet"] == self.aet
            except OSError:
                return False

        wait_until(ready, timeout=60, what="Orthanc")
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM, and wait for Orthanc's orderly stop (about 3 s: its servers' poll timeouts).
        `kill` (SIGKILL) is for teardown, when nothing more is read from it."""
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def request(self, method: str, path: str, body: object | None = None) -> bytes:
        import urllib.request

        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    def get(self, path: str):  # noqa: ANN201
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: object):  # noqa: ANN201
        return json.loads(self.request("POST", path, body))

    def find_instances(self, query: dict) -> list[str]:
        return self.post("/tools/find", {"Level": "Instance", "Query": query})

    def download(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")
