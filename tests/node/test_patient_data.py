"""No patient data outside the DICOM objects (issue 11).

A study whose patient name, ID and birth date are distinctive strings goes through a real node
(`migraine-node serve` with one worker process, the tiny checkpoint, log level DEBUG), with
errors on the way: instances refused (truncated, a path-trick UID, a mismatched request UID, a
declared 2 GB element), a series the worker cannot assemble (mixed orientations, retried then
failed), a series whose patient name has no caret (highdicom would warn with the name), and an
export to three destinations: a DCMTK storescp that stores it, a PACS that refuses every object
(0xC001, a permanent failure) and one that is down (retried).

Then the strings appear nowhere the node writes outside DICOM: not in its log (every line of
serve and worker, DEBUG included: exception messages and tracebacks go there), not in any value of
any column of any table of the job database, not in the raw bytes of the database and WAL files or
any other file under data_dir, not in any C-STORE response's Error Comment, not in `jobs --json`,
and not in the metrics (when node/metrics.py exists). Excluded, because they are DICOM and must
carry the patient: the spool (received instances), sr/, images/ and outbox/ (our results), and what
the storescp received.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from model.synth import write_series
from tests.node.test_hostile_input import (
    PIXEL_DATA,
    TWO_GB,
    Raw,
    element,
    encode_dataset,
    explicit_element,
    quiet,
    send_datasets,
    send_raw,
)
from tests.peers import DCMTK_ENV, NodeProcess, free_port, wait_until

PATIENT_NAME = "ZZPATIENT^QUUXNAME"
PATIENT_ID = "PID-7f3a9c"
BIRTH_DATE = "19010203"
# What must not appear, in any case: the values and their parts, the date in other spellings, and
# the caret-less name of the second study.
NEEDLES = ("ZZPATIENT", "QUUXNAME", "PID-7f3a9c", "7f3a9c", "19010203", "1901-02-03", "1901/02/03", "03.02.1901")
_NEEDLE = re.compile("|".join(re.escape(n) for n in NEEDLES), re.IGNORECASE)
DICOM_FOLDERS = ("spool", "sr", "images", "outbox")  # excluded: DICOM objects carry the patient by design
STORESCP = "/usr/bin/storescp"


def leaks(text: str) -> list[str]:
    return sorted({m.group(0) for m in _NEEDLE.finditer(text)})


def with_patient(ds: Dataset, name: str = PATIENT_NAME) -> Dataset:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, PATIENT_ID, BIRTH_DATE
    return ds


def _series(template: list[Dataset], study: str, name: str = PATIENT_NAME) -> list[Dataset]:
    series = generate_uid()
    out = []
    for ds in template:
        ds = with_patient(copy.deepcopy(ds), name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def _refusing_pacs(port: int):  # noqa: ANN202  pynetdicom ThreadedAssociationServer
    """A PACS that answers every C-STORE with 0xC001 (a permanent failure for the exporter)."""

    def refuse(event: evt.Event) -> Dataset:
        rsp = Dataset()
        rsp.Status, rsp.ErrorComment = 0xC001, "test PACS refuses every object"
        return rsp

    ae = AE(ae_title="REFUSER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])


@dataclass
class Run:
    node: NodeProcess
    metrics_port: int
    series: dict[str, str]  # role -> Series Instance UID
    comments: list[str] = field(default_factory=list)  # every Error Comment the node answered
    statuses: list[int] = field(default_factory=list)

    def store(self):  # noqa: ANN201
        from node.config import load_settings
        from storage.db import make_engine
        from storage.store import JobStore

        return JobStore(make_engine(load_settings(self.node.config).storage.resolved_database_url))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint) -> Iterator[Run]:
    top = tmp_path_factory.mktemp("patient-data")
    (top / "node").mkdir()
    received = top / "pacs"
    received.mkdir()
    template = [pydicom.dcmread(p) for p in
                write_series(top / "template", slices=100, rows=16, columns=16, spacing=1.0, seed=5).paths]
    pacs_port, refuser_port, down_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    pacs = subprocess.Popen([STORESCP, "-od", str(received), "-aet", "PACS", str(pacs_port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refuser = _refusing_pacs(refuser_port)
    node = NodeProcess.write_config(
        top / "node", idle_seconds=1, workers=1, checkpoint=tiny_checkpoint, runtime="torch",
        export_retry_seconds=1,
        destinations=[{"name": "pacs", "ae_title": "PACS", "port": pacs_port},
                      {"name": "refuser", "ae_title": "REFUSER", "port": refuser_port},
                      {"name": "down", "ae_title": "DOWN", "port": down_port}],
    )
    # One attempt per job (the failed series fails at once), and metrics, served by node/metrics.py where it exists.
    config_text = node.config.read_text().replace("retry_seconds = 1\n", "retry_seconds = 1\nmax_attempts = 1\n", 1)
    node.config.write_text(config_text)
    with node.config.open("a") as config:
        config.write(f'[metrics]\nport = {metrics_port}\nhost = "127.0.0.1"\n')
    try:
        node.start()
        study, other_study = generate_uid(), generate_uid()
        classified = _series(template, study)
        mixed = _series(template, study)
        for ds in mixed[::2]:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        no_caret = _series(template, other_study, name="ZZPATIENTQUUXNAME")
        result = Run(node, metrics_port, {"classified": str(classified[0].SeriesInstanceUID),
                                          "mixed": str(mixed[0].SeriesInstanceUID),
                                          "no caret": str(no_caret[0].SeriesInstanceUID)})
        for datasets in (classified, mixed, no_caret):
            result.statuses += send_datasets(node.port, datasets)

        # Refused instances of the same patient and study.
        def one() -> Dataset:
            ds = _series(template[:1], study)[0]
            ds.SeriesInstanceUID = generate_uid()
            return ds

        def raw(ds: Dataset, cut=None, request: str | None = None) -> Raw:  # noqa: ANN001
            data = encode_dataset(ds)
            return Raw(cut(data) if cut else data, request or str(ds.SOPInstanceUID))

        bad_uid = one()
        with quiet():
            bad_uid.SeriesInstanceUID = "../" + PATIENT_ID  # a path trick that is patient data too
        refused = [
            raw(one(), cut=lambda d: d[: element(d, PIXEL_DATA).value_offset + 10]),  # truncated
            raw(bad_uid),
            raw(one(), request=generate_uid()),
            raw(one(), cut=lambda d: d[: element(d, PIXEL_DATA).offset]
                + explicit_element(PIXEL_DATA, b"OW", b"\x00" * 16, TWO_GB)),
        ]
        for rsp in send_raw(node.port, top / "raw", refused):
            result.statuses.append(rsp.Status)
            result.comments.append(str(rsp.get("ErrorComment", "")))
        assert result.statuses[-4:] == [0xC210, 0xC211, 0xC212, 0xC210]

        store = result.store()

        def settled() -> bool:
            views = {role: store.get_series(uid) for role, uid in result.series.items()}
            if any(v is None for v in views.values()) or views["mixed"].state != "failed":
                return False
            deliveries = {d["destination"]: d for d in views["classified"].deliveries}
            return (deliveries.get("pacs", {}).get("state") == "sent"
                    and deliveries.get("refuser", {}).get("state") == "failed"
                    and (deliveries.get("down", {}).get("attempts") or 0) >= 1
                    and any(d["destination"] == "pacs" and d["state"] == "sent" for d in views["no caret"].deliveries))

        wait_until(settled, timeout=240, interval=0.5, what="classification, export and the failed series")
        yield result
    finally:
        node.stop()
        refuser.shutdown()
        pacs.terminate()
        pacs.wait(20)


# ---- the checks -----------------------------------------------------------------------------------------


def test_the_errors_really_happened(run: Run):
    """The paths that could leak were taken: refusals, a failed job, failed and retried exports."""
    assert run.statuses.count(0x0000) == 300
    log = run.node.log_text()
    for needed in ("refused with 0xC210", "refused with 0xC211", "refused with 0xC212", "job attempt 1 failed",
                   "result delivery to refuser failed", "result delivery to down will be retried",
                   "delivered to pacs"):
        assert needed in log, needed
    view = run.store().get_series(run.series["mixed"])
    assert view.state == "failed" and "orientations" in view.reason


def test_no_patient_data_in_the_log(run: Run):
    lines = [line for line in run.node.log_text().splitlines() if leaks(line)]
    assert lines == []


def test_no_patient_data_in_any_database_column(run: Run):
    db = run.node.data_dir / "node.db"
    found, values = [], 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608  names from sqlite_master
            columns = [c[0] for c in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    values += 1
                    if leaks(text):
                        found.append(f"{table}.{column}: {text[:200]}")
    assert {"series", "instance", "job", "delivery"} <= set(tables)
    assert values > 300 * 5  # the instances were recorded (and read here)
    assert found == []


def test_no_patient_data_in_any_other_file_of_the_node(run: Run):
    """Raw bytes of everything under data_dir but the DICOM folders: the database and its WAL
    (deleted rows and free pages included), the model cache, anything else."""
    data_dir = run.node.data_dir
    checked, found = [], []
    for path in sorted(data_dir.rglob("*")):
        relative = path.relative_to(data_dir)
        if not path.is_file() or relative.parts[0] in DICOM_FOLDERS:
            continue
        checked.append(str(relative))
        raw = path.read_bytes()
        if leaks(raw.decode("latin-1")) or leaks(raw.decode("utf-16-le", "ignore")):
            found.append(str(relative))
    assert "node.db" in checked
    assert found == []
    assert leaks(run.node.config.read_text()) == []
    # The search itself works on such bytes: the spooled instances (DICOM) do carry the patient.
    spooled = run.node.spool_files()[0].read_bytes().decode("latin-1")
    assert {"ZZPATIENT", "QUUXNAME", PATIENT_ID, BIRTH_DATE} <= set(leaks(spooled))


def test_no_patient_data_in_the_answers_to_senders(run: Run):
    assert len(run.comments) == 4 and all(run.comments)
    assert [c for c in run.comments if leaks(c)] == []


def test_no_patient_data_in_what_jobs_and_status_print(run: Run):
    for command in (("jobs", "--json"), ("status",)):
        out = run.node.cli(*command)
        assert out.returncode == 0, out.stderr
        assert leaks(out.stdout + out.stderr) == [], command


def test_no_patient_data_in_the_metrics(run: Run):
    if importlib.util.find_spec("node.metrics") is None:
        pytest.skip("node/metrics.py does not exist yet: the node serves no metrics to check")
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{run.metrics_port}/metrics", timeout=5) as response:
                body = response.read().decode("utf-8", "replace")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert body.strip()
    assert leaks(body) == []
