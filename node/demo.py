"""`migraine-node demo`: the first-run experience, end to end on loopback.

Builds the synthetic demo model if missing, starts a stand-in PACS (Orthanc
when installed, otherwise a pynetdicom storage SCP) and the node, sends a
synthetic Philips-like 3D T1 study, waits for the result and ends with what a
radiologist would see: the Structured Report's content as text, and where the
SR and the result image are kept under the data directory. Steps are named as
they run, with the seconds since the start.

With `--viewer` (Orthanc with its DICOMweb plugin and the OHIF build needed)
the study also goes to the stand-in PACS, and Orthanc plus the OHIF Viewer
stay up on loopback, with the study's viewer URL printed, until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from node.config import Settings, load_settings
from node.errors import ConfigError, NodeError
from node.signals import stop_on_signals

ORTHANC = "/usr/sbin/Orthanc"
PACS_AE = "DEMO_PACS"
STEPS = 6


def free_port() -> int:
    """A free TCP port on loopback (the demo's peers; the tests' and benchmarks' too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _OrthancPacs:
    name = "Orthanc"

    def __init__(self, root: Path, dicomweb_plugin: str | None = None) -> None:
        self.port, self.http_port = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "migraine-node demo PACS", "StorageDirectory": str(root / "storage"),
                  "IndexDirectory": str(root / "index"), "DicomAet": PACS_AE, "DicomPort": self.port,
                  "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True, "Plugins": []}
        self.dicomweb = dicomweb_plugin is not None
        if dicomweb_plugin is not None:  # what OHIF reads the study through (--viewer)
            from node.viewer import orthanc_dicomweb_config

            config["Plugins"] = [dicomweb_plugin]
            config["DicomWeb"] = orthanc_dicomweb_config()
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/system", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise NodeError(f"Orthanc did not start; see {root / 'orthanc.log'}")

    def has(self, sop_instance_uid: str) -> bool:
        query = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", data=query, method="POST")
        return bool(json.loads(urllib.request.urlopen(req, timeout=10).read()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class _PynetdicomPacs:
    """Stand-in PACS when Orthanc is not installed: keeps what it receives in a scratch folder."""

    name = "pynetdicom storage SCP"

    def __init__(self, root: Path) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
            Verification,
        )

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()

        def on_store(event):  # noqa: ANN001, ANN202
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(root / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=PACS_AE)
        for context in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification):
            ae.add_supported_context(context)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def has(self, sop_instance_uid: str) -> bool:
        return (self.root / f"{sop_instance_uid}.dcm").exists()

    def close(self) -> None:
        self.server.shutdown()


def _send(series_dir: Path, port: int, called: str) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from pynetdicom import evt

    from node.dimse_tuning import set_tcp_nodelay

    ae = AE(ae_title="DEMO_SCANNER")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    if not assoc.is_established:
        raise NodeError(f"{called} on port {port} did not accept the demo association")
    try:
        statuses = [assoc.send_c_store(path) for path in sorted(series_dir.iterdir())]
    finally:
        assoc.release()
    return sum(1 for s in statuses if s and s.Status == 0)


def _viewer_prerequisites() -> str:
    """The DICOMweb plugin's path; ConfigError (exit 2, one line) when --viewer cannot work here."""
    from node.viewer import OHIF_DIST_ENV, find_ohif_dist, orthanc_dicomweb_plugin

    if not Path(ORTHANC).exists():
        raise ConfigError(f"--viewer needs Orthanc ({ORTHANC}); install the Debian packages orthanc and "
                          "orthanc-dicomweb (`make test` installs them)")
    plugin = orthanc_dicomweb_plugin()
    if plugin is None:
        raise ConfigError("--viewer needs Orthanc's DICOMweb plugin; install the Debian package orthanc-dicomweb "
                          "(`make test` installs it)")
    if find_ohif_dist() is None:
        raise ConfigError(f"--viewer needs the OHIF Viewer build; run `make ohif`, or set {OHIF_DIST_ENV} "
                          "to an @ohif/app dist/ folder")
    return plugin


def _sr_file(view, data_dir: Path) -> Path | None:  # noqa: ANN001  storage.store.SeriesView
    """The SR the worker wrote (the job's sr_path), found by its SOP Instance UID on older stores."""
    recorded = getattr(view, "sr_path", None)
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    if view.sr_sop_instance_uid:
        return next((data_dir / "sr").glob(f"*/*/{view.sr_sop_instance_uid}.dcm"), None)
    return None


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    restore = stop_on_signals(stop, [signal.SIGINT, signal.SIGTERM])
    try:
        while not stop.wait(1):
            pass
    finally:
        restore()


def run_demo(settings: Settings, config_path: str | None, timeout: float = 900, viewer: bool = False) -> int:
    started = time.monotonic()

    def step(number: int, text: str) -> None:
        print(f"{number}/{STEPS} [{time.monotonic() - started:4.0f} s] {text}", flush=True)

    def detail(text: str) -> None:
        print(f"           {text}", flush=True)

    print("migraine-node demo: the node and a stand-in PACS on loopback, one synthetic study "
          "(research use only; no patient data)", flush=True)
    plugin = _viewer_prerequisites() if viewer else None
    data_dir = settings.storage.data_dir.resolve()

    step(1, "demo model")
    from node.worker import model_directory

    model_dir = model_directory(settings, progress=True)  # builds the synthetic demo model when missing
    info = json.loads((model_dir / "model.json").read_text())
    kind = "SYNTHETIC demo model" if info["synthetic"] else "model"
    auc = info.get("training", {}).get("test_auc")
    detail(f"{kind} {info['name']} in {model_dir}" + (f" (held-out synthetic test AUC {auc})" if auc is not None
                                                      and info["synthetic"] else ""))

    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="migraine-node-demo-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        step(2, "stand-in PACS")
        if Path(ORTHANC).exists():
            pacs: _OrthancPacs | _PynetdicomPacs = _OrthancPacs(scratch / "orthanc", plugin)
        else:
            pacs = _PynetdicomPacs(scratch / "pacs")
        stack.callback(pacs.close)
        detail(f"{pacs.name} as {PACS_AE} on 127.0.0.1:{pacs.port} (temporary: removed when the demo ends)")

        step(3, "node")
        destination = {"name": "demo-pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs.port}
        destination["objects"] = ["sr", "image"]  # the PACS gets the result image too (for viewers without SR)
        overrides = {
            "node": {"host": "127.0.0.1", "port": free_port(), "log_level": "WARNING"},  # the steps say it
            "model": {"checkpoint": str(model_dir)},
            "destinations": [destination],
        }
        node_settings = load_settings(config_path, overrides)
        from node.service import NodeService

        service = NodeService(node_settings, config_path, overrides)
        service.start()
        stack.callback(service.stop)
        detail(f"{node_settings.node.ae_title} listening on 127.0.0.1:{service.port}, data in {data_dir}")

        step(4, "synthetic study")
        from model.synth import write_series

        series = write_series(scratch / "study", responder=True, seed=int(time.time()) % 100000)
        sent = _send(scratch / "study", service.port, node_settings.node.ae_title)
        detail(f"sent a synthetic Philips-like 3D T1 series to the node: 170 sagittal slices of 256 x 256 "
               f"({sent} acknowledged; the phantom carries the planted 'responder' feature)")
        if viewer:
            _send(scratch / "study", pacs.port, PACS_AE)  # as a scanner would: the images go to PACS too
            detail("and the same series to the stand-in PACS, for the viewer")

        step(5, "classification")
        deadline = time.monotonic() + timeout
        view = None
        while time.monotonic() < deadline:
            view = service.store.get_series(series.series_instance_uid)
            if view is not None and view.state in ("delivered", "failed", "skipped"):
                break
            time.sleep(0.5)
        if view is None or view.state != "delivered":
            state = "no series" if view is None else f"{view.state}: {view.reason}"
            detail(f"no result delivered ({state})")
            return 1
        detail(f"{view.label}, probability of NSAID response {view.probability:.3f} (model {view.model_id})")
        detail("stage timings (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in (view.timings or {}).items()))
        delivered = "delivered to" if pacs.has(view.sr_sop_instance_uid) else "NOT found in"
        detail(f"SR {delivered} the stand-in PACS {PACS_AE}")

        step(6, "what the radiologist sees (the Structured Report):")
        sr_path = _sr_file(view, data_dir)
        if sr_path is not None:
            import pydicom

            from node.sr_text import sr_as_text

            for line in sr_as_text(pydicom.dcmread(sr_path), collapse=("Image Library",)):
                print(f"    {line}")
            print(f"  SR kept at {sr_path}")
        else:
            print(f"  SR {view.sr_sop_instance_uid} not found under {data_dir / 'sr'}")
        image_path = getattr(view, "image_path", None)
        if image_path:
            print(f"  result image kept at {image_path}")
        if info["synthetic"]:
            print("  SYNTHETIC demo model: this result has no clinical meaning. Research use only.")

        if viewer:
            from node.viewer import ViewerServer

            assert isinstance(pacs, _OrthancPacs)
            server = stack.enter_context(ViewerServer(pacs.http_port))
            print(f"\nOHIF viewer (loopback only): {server.study_url(series.study_instance_uid)}", flush=True)
            print("Orthanc and the viewer stay up until Ctrl-C.", flush=True)
            _wait_for_stop()
            print()
    print(f"demo finished in {time.monotonic() - started:.0f} s; node and stand-in PACS shut down, "
          f"results kept under {data_dir}")
    return 0
