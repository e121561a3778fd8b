"""`migraine-node demo`: the first-run experience, end to end on loopback.

Builds the synthetic demo model if missing, starts the node and a stand-in
PACS (Orthanc when installed, otherwise a pynetdicom storage SCP), sends a
synthetic Philips-like 3D T1 study, waits for the SR, prints the prediction,
where the SR went and the per-stage timings, and shuts everything down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from node.config import Settings, load_settings
from node.errors import NodeError

ORTHANC = "/usr/sbin/Orthanc"
PACS_AE = "DEMO_PACS"


def free_port() -> int:
    """A free TCP port on loopback (the demo's peers; the tests' and benchmarks' too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _OrthancPacs:
    def __init__(self, root: Path) -> None:
        self.port, self.http_port = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "migraine-node demo PACS", "StorageDirectory": str(root / "storage"),
                  "IndexDirectory": str(root / "index"), "DicomAet": PACS_AE, "DicomPort": self.port,
                  "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "UnknownSopClassAccepted": True, "Plugins": []}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/system", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise NodeError("Orthanc did not start; see orthanc.log")

    def where(self, sr_sop_instance_uid: str) -> str:
        query = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sr_sop_instance_uid}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", data=query, method="POST")
        ids = json.loads(urllib.request.urlopen(req, timeout=10).read())
        return f"Orthanc {PACS_AE}@127.0.0.1:{self.port}, http://127.0.0.1:{self.http_port}/instances/{ids[0]}" if ids \
            else f"not found in Orthanc {PACS_AE}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


class _PynetdicomPacs:
    """Stand-in PACS when Orthanc is not installed: stores what it receives in a folder."""

    def __init__(self, root: Path) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ComprehensiveSRStorage, Verification  # type: ignore[attr-defined]

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()

        def on_store(event):  # noqa: ANN001, ANN202
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(root / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(ComprehensiveSRStorage)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def where(self, sr_sop_instance_uid: str) -> str:
        path = self.root / f"{sr_sop_instance_uid}.dcm"
        return f"stand-in PACS {PACS_AE}@127.0.0.1:{self.port}, stored as {path}" if path.exists() else "not received"

    def close(self) -> None:
        self.server.shutdown()


def _send(series_dir: Path, port: int, called: str) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="DEMO_SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise NodeError("the node did not accept the demo association")
    try:
        statuses = [assoc.send_c_store(path) for path in sorted(series_dir.iterdir())]
    finally:
        assoc.release()
    return sum(1 for s in statuses if s and s.Status == 0)


def run_demo(settings: Settings, config_path: str | None, timeout: float = 1800) -> int:
    from model.synth import write_series
    from node.service import NodeService
    from node.worker import model_directory

    print("1/5 demo model:", flush=True)
    model_dir = model_directory(settings, progress=True)  # builds the synthetic demo model when missing
    info = json.loads((model_dir / "model.json").read_text())
    print(f"    {info['name']} ({'SYNTHETIC' if info['synthetic'] else 'trained'}), {model_dir}", flush=True)

    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="migraine-node-demo-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        pacs = _OrthancPacs(scratch / "orthanc") if Path(ORTHANC).exists() else _PynetdicomPacs(scratch / "pacs")
        stack.callback(pacs.close)
        print(f"2/5 stand-in PACS: {type(pacs).__name__.strip('_')} as {PACS_AE} on 127.0.0.1:{pacs.port}", flush=True)

        overrides = {
            "node": {"host": "127.0.0.1", "port": free_port()},
            "model": {"checkpoint": str(model_dir)},
            "destinations": [{"name": "demo-pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs.port}],
        }
        node_settings = load_settings(config_path, overrides)
        service = NodeService(node_settings, config_path, overrides)
        service.start()
        stack.callback(service.stop)
        print(f"3/5 node {node_settings.node.ae_title} listening on 127.0.0.1:{service.port}", flush=True)

        series = write_series(scratch / "study", responder=True, seed=int(time.time()) % 100000)
        sent = _send(scratch / "study", service.port, node_settings.node.ae_title)
        print(f"4/5 sent a synthetic 170-slice Philips-like 3D T1 series ({sent} instances acknowledged)", flush=True)

        deadline = time.monotonic() + timeout
        view = None
        while time.monotonic() < deadline:
            view = service.store.get_series(series.series_instance_uid)
            if view is not None and view.state in ("delivered", "failed", "skipped"):
                break
            time.sleep(0.5)
        if view is None or view.state != "delivered":
            state = "no series" if view is None else f"{view.state}: {view.reason}"
            print(f"5/5 no SR delivered ({state})")
            return 1
        print(f"5/5 prediction: {view.label}, probability of NSAID response {view.probability:.3f} "
              f"(model {view.model_id}, SYNTHETIC demo model: no clinical meaning; research use only)")
        print(f"    SR {view.sr_sop_instance_uid}: {pacs.where(view.sr_sop_instance_uid)}")
        print("    stage timings (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in (view.timings or {}).items()))
    print("demo finished; everything shut down")
    return 0
