"""DICOMweb STOW-RS export: a real Orthanc with its DICOMweb plugin (open, and with basic auth), a real
local HTTP server (bearer auth, scripted answers), a real SQLite queue; and the pure functions of
node/dicomweb.py (multipart body, response classification)."""

from __future__ import annotations

import base64
import email
import email.policy
import http.server
import io
import json
import logging
import os
import socket
import threading
import time
from http import HTTPStatus
from pathlib import Path

import pydicom
import pytest

from node import dicomweb
from node.config import Destination, ExportSection
from node.echo import dicomweb_echo, echo
from node.errors import ConfigError, PeerError
from node.export import Exporter
from tests.peers import OrthancProcess, free_port, wait_until

BASIC_ENV = "STOW_TEST_BASIC"
BEARER_ENV = "STOW_TEST_BEARER"
USER, PASSWORD = "stow-user", "Pa55-w0rd-s3cret-4711"
WRONG_PASSWORD = "wr0ng-s3cret-0815"
TOKEN = "tok-3f9a1c7e5b2d4f60a8e1"


# ---- real results, a real queue -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The SR and result image the worker writes for a tiny synthetic series (its own encoder), as ResultFiles."""
    from model.checkpoint import ModelInfo
    from model.predict import Prediction
    from model.preprocess import InputSpec
    from model.synth import write_series
    from node.identity import result_identity
    from node.worker import _encode_results
    from storage.jobs import ResultFile

    root = tmp_path_factory.mktemp("stow-results")
    series = write_series(root / "source", slices=4, rows=16, columns=16, spacing=4.0, seed=3)
    datasets = [pydicom.dcmread(path) for path in series.paths]
    info = ModelInfo(name="stow-test", architecture="resnet10", input_spec=InputSpec(), cutoff=0.5,
                     sha256="ab" * 32, synthetic=True)
    prediction = Prediction(probability=0.71, label="responder", cutoff=0.5, model_id=info.model_id, device="cpu",
                            ms=1.0, synthetic=True)
    identity = result_identity(series.series_instance_uid, "cd" * 32, info.sha256, info.cutoff)
    objects = []
    for kind, (ds, data) in _encode_results(datasets, prediction, info, identity, None).items():
        path = root / f"{kind}.dcm"
        path.write_bytes(data)
        objects.append(ResultFile(kind, str(ds.SOPClassUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                  str(path), identity.content_key))
    assert [o.kind for o in objects] == ["sr", "image"]
    return series, tuple(objects)


def _pending(tmp_path: Path, results, destinations=("pacs",), jobs: int = 1):
    """A real SQLite queue holding `jobs` classified jobs (one series each) with the results pending for
    `destinations`; (store, queue, source series UIDs)."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from storage.db import make_engine, sqlite_url
    from storage.jobs import JobQueue
    from storage.store import InstanceRecord, JobStore

    series, objects = results
    store = JobStore(make_engine(sqlite_url(tmp_path / "node.db")))
    queue = JobQueue(store.engine)
    uids = [series.series_instance_uid] + [generate_uid() for _ in range(jobs - 1)]
    for uid in uids:
        store.record_instance(InstanceRecord(series.study_instance_uid, uid, generate_uid(), MRImageStorage,
                                             ExplicitVRLittleEndian, f"x/{uid}/1.dcm", 100), replaced_content=False)
        [snapshot] = store.receiving_series()
        assert store.mark_complete(snapshot, "test")
        [(job_id, _)] = queue.awaiting_selection()
        queue.selected(job_id, True, "test")
        claimed = queue.claim()
        sr = objects[0]
        result = {"objects": list(objects), "probability": 0.71, "label": "responder", "model_id": "m",
                  "device": "cpu", "synthetic": True, "timings": {}, "sr_sop_instance_uid": sr.sop_instance_uid,
                  "sr_path": sr.path}
        assert queue.finish(claimed.job_id, result, list(destinations))
    return store, queue, uids


def _exporter(queue, *destinations: Destination, **section) -> Exporter:
    section = {"retry_initial_seconds": 60, "retry_max_seconds": 60, "max_attempts": 5, "timeout_seconds": 5,
               **section}
    return Exporter(queue, list(destinations), "MIGNODE", ExportSection(**section))


ROW_KEYS = ("destination", "state", "attempts", "last_error")


def _delivery(store, series_uid: str) -> dict:
    """The series' one delivery row: its destination, state, attempts and last error."""
    [delivery] = store.get_series(series_uid).deliveries
    return {key: delivery[key] for key in ROW_KEYS}


def _make_due(store) -> None:
    from sqlalchemy import update

    from storage.models import Delivery

    with store.engine.begin() as conn:
        conn.execute(update(Delivery).values(next_attempt_at=0))


def _next_attempt_delay(store) -> float:
    from sqlalchemy import select

    from storage.models import Delivery

    with store.engine.connect() as conn:
        [(next_at, updated)] = conn.execute(select(Delivery.next_attempt_at, Delivery.updated_at)).all()
    return next_at - updated


def _db_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("node.db*")))


def _log_text(caplog) -> str:
    formatter = logging.Formatter()
    return "\n".join(r.getMessage() + (formatter.formatException(r.exc_info) if r.exc_info else "")
                     for r in caplog.records)


def _secret_forms(*secrets: str) -> list[bytes]:
    forms = []
    for secret in secrets:
        forms += [secret.encode(), base64.b64encode(f"{USER}:{secret}".encode())]
    return forms


# ---- Orthanc with the DICOMweb plugin ----------------------------------------------------------------------------

class AuthOrthanc(OrthancProcess):
    """OrthancProcess whose own REST calls (readiness, checks) carry basic credentials."""

    credentials: tuple[str, str] | None = None

    def request(self, method: str, path: str, body: object | None = None) -> bytes:
        import urllib.request

        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.credentials:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read()

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web/"  # the config drops the trailing slash


def _orthanc(root: Path, users: dict[str, str] | None = None) -> AuthOrthanc:
    pacs = AuthOrthanc.create(root, dicomweb=True)
    if users:
        config = json.loads((root / "orthanc.json").read_text())
        config.update({"AuthenticationEnabled": True, "RegisteredUsers": users})
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        pacs.credentials = next(iter(users.items()))
    return pacs.start()


@pytest.fixture(scope="module")
def orthancs(tmp_path_factory):
    """Two Orthancs for the module: open, and with basic auth; stopped together (each takes seconds)."""
    started: list[AuthOrthanc] = []
    try:
        started.append(_orthanc(tmp_path_factory.mktemp("orthanc")))
        started.append(_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users={USER: PASSWORD}))
        yield tuple(started)
    finally:
        for pacs in started:
            pacs.stop(kill=True)


@pytest.fixture
def orthanc(orthancs):
    return orthancs[0]


@pytest.fixture
def orthanc_auth(orthancs):
    return orthancs[1]


def test_sr_and_image_stored_in_orthanc_by_stow_rs(orthanc, results, tmp_path):
    series, objects = results
    store, queue, [uid] = _pending(tmp_path, results)
    destination = Destination(name="pacs", url=orthanc.dicomweb_url, objects=["sr", "image"])
    assert destination.url == orthanc.dicomweb_url.rstrip("/")
    assert _exporter(queue, destination).run_due() == 1
    assert _delivery(store, uid) == {"destination": "pacs", "state": "sent", "attempts": 1, "last_error": None}
    view = store.get_series(uid)
    assert view.state == "delivered"
    # Each object acknowledged is on record with the HTTP status of the STOW-RS answer.
    assert sorted((o["kind"], o["sop_instance_uid"], o["status"]) for o in view.sent_objects) == sorted(
        (o.kind, o.sop_instance_uid, 200) for o in objects)
    for obj in objects:
        [instance] = orthanc.find_instances({"SOPInstanceUID": obj.sop_instance_uid})
        assert orthanc.download(instance) == Path(obj.path).read_bytes()  # stored as sent, byte for byte
    # And through DICOMweb itself (QIDO-RS): the SR is in the source's study.
    found = json.loads(orthanc.request("GET", f"/dicom-web/studies/{series.study_instance_uid}/instances"))
    assert {i["00080018"]["Value"][0] for i in found} == {o.sop_instance_uid for o in objects}


def test_sr_only_destination_sends_the_sr_alone(orthanc, results, tmp_path):
    store, queue, [uid] = _pending(tmp_path, results, destinations=("pacs", "web"))
    _exporter(queue, Destination(name="pacs", url=orthanc.dicomweb_url),  # objects = ["sr"]
              Destination(name="web", url=orthanc.dicomweb_url, objects=["image"])).run_due()
    view = store.get_series(uid)
    assert {d["destination"]: d["state"] for d in view.deliveries} == {"pacs": "sent", "web": "sent"}
    assert sorted((o["destination"], o["kind"]) for o in view.sent_objects) == [("pacs", "sr"), ("web", "image")]


def test_echo_by_destination_name(orthanc):
    """`echo NAME`: QIDO-RS for a DICOMweb destination, C-ECHO for a DICOM one; AE@HOST:PORT as before."""
    destinations = [Destination(name="web", url=orthanc.dicomweb_url),
                    Destination(name="dimse", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)]
    web = echo("web", destinations, "MIGNODE", timeout=5)
    assert web.what == f"QIDO-RS web ({orthanc.dicomweb_url.rstrip('/')})" and not web.dimse and web.ms >= 0
    dimse = echo("dimse", destinations, "MIGNODE", timeout=5)
    assert dimse.what == f"C-ECHO {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}" and dimse.dimse
    assert echo(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", destinations, "MIGNODE", timeout=5).dimse


def test_basic_auth_right_wrong_and_missing_credentials(orthanc_auth, results, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    _, objects = results
    destination = Destination(name="pacs", url=orthanc_auth.dicomweb_url, auth="basic", credentials_env=BASIC_ENV)

    # Right credentials: delivered.
    monkeypatch.setenv(BASIC_ENV, f"{USER}:{PASSWORD}")
    store, queue, [uid] = _pending(tmp_path / "right", results)
    _exporter(queue, destination).run_due()
    assert _delivery(store, uid)["state"] == "sent"
    assert orthanc_auth.find_instances({"SOPInstanceUID": objects[0].sop_instance_uid})
    assert dicomweb_echo(destination, timeout=5) >= 0  # `echo pacs`: an authenticated QIDO-RS

    # Wrong credentials: 401, a permanent failure that says so and names the variable to check.
    monkeypatch.setenv(BASIC_ENV, f"{USER}:{WRONG_PASSWORD}")
    store, queue, [uid] = _pending(tmp_path / "wrong", results)
    _exporter(queue, destination).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "failed" and delivery["attempts"] == 1
    assert "HTTP 401 Unauthorized" in delivery["last_error"] and f"${BASIC_ENV}" in delivery["last_error"]
    assert destination.describe() in delivery["last_error"]
    assert store.get_series(uid).sent_objects == []
    with pytest.raises(PeerError, match="401"):
        echo("pacs", [destination], "MIGNODE", timeout=5)

    # No variable at all: a permanent failure naming the variable, nothing sent.
    monkeypatch.delenv(BASIC_ENV)
    store, queue, [uid] = _pending(tmp_path / "missing", results)
    _exporter(queue, destination).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "failed" and BASIC_ENV in delivery["last_error"]
    assert "not set or empty" in delivery["last_error"]
    with pytest.raises(dicomweb.CredentialsError, match=BASIC_ENV):
        dicomweb_echo(destination)

    # The secrets (as given, and as the header carries them) are in no log record and no database file.
    logged = _log_text(caplog)
    assert "401" in logged  # the failure was logged
    for form in _secret_forms(PASSWORD, WRONG_PASSWORD):
        assert form.decode() not in logged
        for sub in ("right", "wrong", "missing"):
            assert form not in _db_bytes(tmp_path / sub), (sub, form)


# ---- a local HTTP server: bearer auth and scripted answers -----------------------------------------------------

def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """A multipart body parsed back by the standard library's MIME parser: (content type, payload) per part."""
    msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
                                   policy=email.policy.HTTP)
    assert msg.get_content_type() == "multipart/related" and msg.get_param("type") == "application/dicom"
    return [(part.get_content_type(), part.get_payload(decode=True)) for part in msg.iter_parts()]


def _dicom_json_answer(referenced=(), failed=()) -> bytes:
    def item(uid, tag=None, code=None):
        out = {"00081155": {"vr": "UI", "Value": [uid]}}
        if tag:
            out[tag] = {"vr": "US", "Value": [code]}
        return out

    return json.dumps({
        "00081198": {"vr": "SQ", "Value": [item(uid, "00081197", code) for uid, code in failed]},
        "00081199": {"vr": "SQ", "Value": [item(uid) for uid in referenced]},
    }).encode()


class StowServer:
    """STOW-RS on 127.0.0.1 that wants `Authorization: Bearer <token>`, keeps what it stores and answers
    the scripted (status, content type, body) first, then 200 with every instance referenced."""

    def __init__(self, token: str, script=()):
        self.token = token
        self.script = list(script)
        self.requests: list[dict] = []
        self.stored: list[bytes] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a PACS would

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._answer(401, "text/plain", b"bearer token required")
                self._answer(200, "application/dicom+json", b"[]")

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                        "client": self.client_address})
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._answer(401, "text/plain", b"bearer token required")
                if server.script:
                    return self._answer(*server.script.pop(0))
                parts = [payload for _, payload in _parts(self.headers["Content-Type"], body)]
                server.stored.extend(parts)
                uids = [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID for p in parts]
                self._answer(200, "application/dicom+json", _dicom_json_answer(referenced=uids))

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def stow_server():
    started = []

    def make(token: str = TOKEN, script=()) -> StowServer:
        server = StowServer(token, script)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


def _bearer(server: StowServer, **kw) -> Destination:
    return Destination(name="pacs", url=server.url, auth="bearer", credentials_env=BEARER_ENV, **kw)


def test_bearer_token_delivers_both_objects_over_one_connection(stow_server, results, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    _, objects = results
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    server = stow_server()
    store, queue, uids = _pending(tmp_path, results, jobs=2)
    assert _exporter(queue, _bearer(server, objects=["sr", "image"])).run_due() == 2
    for uid in uids:
        assert _delivery(store, uid)["state"] == "sent"
        assert sorted(o["status"] for o in store.get_series(uid).sent_objects) == [200, 200]
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first["path"] == "/dicomweb/studies"
    assert first["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert first["headers"]["Accept"] == "application/dicom+json"
    content_type = first["headers"]["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    # The request body is the two Part-10 files, byte for byte, as application/dicom parts.
    assert _parts(content_type, first["body"]) == [("application/dicom", Path(o.path).read_bytes()) for o in objects]
    assert len({r["client"] for r in server.requests}) == 1  # one keep-alive connection for the batch
    assert TOKEN not in _log_text(caplog) and TOKEN.encode() not in _db_bytes(tmp_path)


def test_bearer_wrong_token_is_a_permanent_failure(stow_server, results, tmp_path, monkeypatch):
    monkeypatch.setenv(BEARER_ENV, "not-the-token")
    server = stow_server()
    store, queue, [uid] = _pending(tmp_path, results)
    _exporter(queue, _bearer(server)).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "failed" and delivery["attempts"] == 1
    assert "HTTP 401" in delivery["last_error"] and "bearer token required" in delivery["last_error"]
    assert "not-the-token" not in delivery["last_error"] and server.stored == []
    with pytest.raises(PeerError, match=rf"401.*{BEARER_ENV}"):
        echo("pacs", [_bearer(server)], "MIGNODE", timeout=5)
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    assert echo("pacs", [_bearer(server)], "MIGNODE", timeout=5).what.startswith("QIDO-RS pacs (http://127.0.0.1")


def test_503_is_retried_with_backoff_then_delivered_once(stow_server, results, tmp_path, monkeypatch):
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    server = stow_server(script=[(503, "text/plain", b"archive busy, try later")])
    store, queue, [uid] = _pending(tmp_path, results)
    exporter = _exporter(queue, _bearer(server), retry_initial_seconds=0.05, retry_max_seconds=0.1)
    assert exporter.run_due() == 1
    delivery = _delivery(store, uid)
    assert delivery["state"] == "pending" and delivery["attempts"] == 1
    assert "HTTP 503" in delivery["last_error"] and "archive busy" in delivery["last_error"]
    assert 0 < _next_attempt_delay(store) <= 0.05  # backoff: initial x U(0.5, 1)
    wait_until(lambda: exporter.run_due() == 1, timeout=10, interval=0.02, what="the retry to fall due")
    delivery = _delivery(store, uid)
    assert delivery == {"destination": "pacs", "state": "sent", "attempts": 2, "last_error": None}
    assert len(server.requests) == 2 and len(server.stored) == 1  # delivered once
    assert [(o["kind"], o["status"]) for o in store.get_series(uid).sent_objects] == [("sr", 200)]


@pytest.mark.parametrize("status, body, transient, expected", [
    (400, b"missing Study Instance UID", False, "HTTP 400 Bad Request: missing Study Instance UID"),
    (413, b"", False, f"HTTP 413 {HTTPStatus(413).phrase}"),
    (415, b"<html><body><h1>unsupported</h1></body></html>", False, "HTTP 415 Unsupported Media Type: unsupported"),
    (429, b"slow down", True, "HTTP 429 Too Many Requests: slow down"),
    (500, b"", True, "HTTP 500 Internal Server Error"),
])
def test_http_errors_permanent_or_transient(stow_server, results, tmp_path, monkeypatch, status, body, transient,
                                            expected):
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    server = stow_server(script=[(status, "text/html" if body.startswith(b"<") else "text/plain", body)])
    store, queue, [uid] = _pending(tmp_path, results)
    _exporter(queue, _bearer(server)).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == ("pending" if transient else "failed") and delivery["attempts"] == 1
    assert delivery["last_error"] == f"STOW-RS to pacs ({server.url}): {expected}"


def test_202_with_a_failed_instance(stow_server, results, tmp_path, monkeypatch):
    """Partly stored: the stored object is on record with 202, the other's FailureReason decides."""
    _, (sr, image) = results
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    answer = _dicom_json_answer(referenced=[sr.sop_instance_uid], failed=[(image.sop_instance_uid, 0xC000)])
    server = stow_server(script=[(202, "application/dicom+json", answer)])
    store, queue, [uid] = _pending(tmp_path, results)
    _exporter(queue, _bearer(server, objects=["sr", "image"])).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "failed"
    assert delivery["last_error"].endswith("HTTP 202 Accepted: image: FailureReason 0xC000 cannot understand")
    assert [(o["kind"], o["status"]) for o in store.get_series(uid).sent_objects] == [("sr", 202)]


def test_409_out_of_resources_is_transient(stow_server, results, tmp_path, monkeypatch):
    _, (sr, _) = results
    monkeypatch.setenv(BEARER_ENV, TOKEN)
    server = stow_server(script=[(409, "application/dicom+json", _dicom_json_answer(failed=[(sr.sop_instance_uid,
                                                                                              0xA700)]))])
    store, queue, [uid] = _pending(tmp_path, results)
    _exporter(queue, _bearer(server)).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "pending" and "HTTP 409 Conflict: sr: FailureReason 0xA700" in delivery["last_error"]


# ---- PACS down, PACS silent -----------------------------------------------------------------------------------------

def test_pacs_down_is_retried_with_backoff_and_the_reason_is_on_the_row(results, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="node.export")
    store, queue, [uid] = _pending(tmp_path, results, jobs=1)
    destination = Destination(name="pacs", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    exporter = _exporter(queue, destination, retry_initial_seconds=30, retry_max_seconds=60)
    for attempt in (1, 2, 3):
        assert exporter.run_due() == 1
        delivery = _delivery(store, uid)
        assert delivery["state"] == "pending" and delivery["attempts"] == attempt
        assert delivery["last_error"] == f"cannot connect to {destination.describe()}: connection refused"
        assert queue.due_deliveries(time.time()) == []  # backed off, not retried on the next tick
        delay = _next_attempt_delay(store)
        base = min(60, 30 * 2 ** (attempt - 1))
        assert base / 2 - 1 <= delay <= base  # initial x 2^(attempts-1), capped, x U(0.5, 1)
        _make_due(store)
    warnings = [r for r in caplog.records if r.name == "node.export" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "will be retried" in warnings[0].getMessage()  # same reason: warned once
    assert store.get_series(uid).sent_objects == []


def test_a_silent_pacs_times_out_and_is_retried(results, tmp_path):
    """A listener that never answers: the request times out (timeout_seconds), a temporary failure."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts by the kernel's backlog, never reads
        port = listener.getsockname()[1]
        store, queue, [uid] = _pending(tmp_path, results)
        destination = Destination(name="pacs", url=f"http://127.0.0.1:{port}/dicom-web")
        _exporter(queue, destination, timeout_seconds=0.3).run_due()
    delivery = _delivery(store, uid)
    assert delivery["state"] == "pending" and delivery["last_error"] == (
        f"no answer from {destination.describe()}: timed out")


def test_credentials_in_the_url_are_refused_by_the_config_unshown(tmp_path):
    from node.config import load_settings

    config = tmp_path / "node.toml"
    config.write_text('[[destinations]]\nname = "pacs"\nurl = "http://bob:pw-in-url@127.0.0.1:8042/dw"\n')
    with pytest.raises(ConfigError, match="no user:password in url") as info:
        load_settings(config)
    assert "[[destinations]] #1 url" in str(info.value) and "pw-in-url" not in str(info.value)


def test_echo_reports_an_unreachable_dicomweb_destination():
    destination = Destination(name="pacs", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(PeerError, match=r"cannot connect to pacs .*connection refused"):
        echo("pacs", [destination], "MIGNODE", timeout=2)
    with pytest.raises(PeerError, match="known: pacs"):
        echo("nonesuch", [destination], "MIGNODE")


# ---- pure functions ------------------------------------------------------------------------------------------------

def test_multipart_body_round_trips_through_the_mime_parser():
    parts = [os.urandom(3000) + b"\r\n--\r\n\n\r--x" + os.urandom(100), b"", b"DICM\r\n", b"\n\r" * 50]
    boundary = dicomweb.new_boundary(parts)
    body = dicomweb.multipart_related(parts, boundary)
    content_type = dicomweb.multipart_content_type(boundary)
    assert content_type == f'multipart/related; type="application/dicom"; boundary={boundary}'
    assert _parts(content_type, body) == [("application/dicom", p) for p in parts]
    # And by splitting on the delimiter (RFC 2046): preamble-free, a close delimiter at the end.
    delimiter = b"\r\n--" + boundary.encode()
    pieces = (b"\r\n" + body).split(delimiter)
    assert pieces[0] == b"" and pieces[-1] == b"--\r\n"
    assert [p.split(b"\r\n\r\n", 1)[1] for p in pieces[1:-1]] == parts


def test_multipart_boundary_never_occurs_in_a_part():
    with pytest.raises(ValueError):
        dicomweb.multipart_related([b"xx--abc--xx"], "abc")
    with pytest.raises(ValueError):
        dicomweb.multipart_related([b""], "b" * 71)
    part = b"migraine-node-" * 10
    assert dicomweb.new_boundary([part]).encode() not in part


SR_UID, IMAGE_UID = "1.2.3.1", "1.2.3.2"
SENT = [SR_UID, IMAGE_UID]
LABELS = {SR_UID: "sr", IMAGE_UID: "image"}
DJ = "application/dicom+json"


@pytest.mark.parametrize("status, reason, content_type, body, stored, failed, transient, message", [
    # 200: all stored, with or without a body listing them.
    (200, "OK", DJ, _dicom_json_answer(referenced=SENT), SENT, [], False, ""),
    (200, "OK", "", b"", SENT, [], False, ""),
    (200, "OK", "application/dicom+xml", b"<NativeDicomModel/>", SENT, [], False, ""),
    # 200 that still lists a failure (older servers): the list wins.
    (200, "OK", DJ, _dicom_json_answer(referenced=[SR_UID], failed=[(IMAGE_UID, 0x0110)]), [SR_UID], [IMAGE_UID],
     False, "HTTP 200 OK: image: FailureReason 0x0110 processing failure"),
    # 202: only what is referenced was stored.
    (202, "Accepted", DJ, _dicom_json_answer(referenced=SENT), SENT, [], False, ""),
    (202, "Accepted", DJ, _dicom_json_answer(referenced=[SR_UID], failed=[(IMAGE_UID, 0xA700)]), [SR_UID],
     [IMAGE_UID], True, "HTTP 202 Accepted: image: FailureReason 0xA700 out of resources"),
    (202, "Accepted", "", b"", [], SENT, True,
     "HTTP 202 Accepted: sr: not acknowledged in the response; image: not acknowledged in the response"),
    # Not 2xx: nothing stored.
    (409, "Conflict", DJ, _dicom_json_answer(failed=[(SR_UID, 0xC000), (IMAGE_UID, 0xA700)]), [], SENT, False,
     "HTTP 409 Conflict: sr: FailureReason 0xC000 cannot understand; image: FailureReason 0xA700 out of resources"),
    (409, "Conflict", DJ, _dicom_json_answer(failed=[(SR_UID, 0xA701)]), [], SENT, True,
     "HTTP 409 Conflict: sr: FailureReason 0xA701 out of resources"),
    (400, "Bad Request", "application/json", b'{"error":  "no\\n boundary"}', [], SENT, False,
     'HTTP 400 Bad Request: {"error": "no\\n boundary"}'),
    (401, "Unauthorized", "", b"", [], SENT, False, "HTTP 401 Unauthorized"),
    (403, "Forbidden", "text/plain", b"x" * 500, [], SENT, False, "HTTP 403 Forbidden: " + "x" * 197 + "..."),
    (404, "Not Found", "text/html", b"<html><title>404</title><p>no route</p></html>", [], SENT, False,
     "HTTP 404 Not Found: 404 no route"),
    (415, "Unsupported Media Type", "application/octet-stream", b"\x00\x01", [], SENT, False,
     "HTTP 415 Unsupported Media Type"),
    (408, "Request Timeout", "", b"", [], SENT, True, "HTTP 408 Request Timeout"),
    (429, "Too Many Requests", "", b"", [], SENT, True, "HTTP 429 Too Many Requests"),
    (500, "Internal Server Error", DJ, b"{not json", [], SENT, True, "HTTP 500 Internal Server Error: {not json"),
    (502, "Bad Gateway", "", b"", [], SENT, True, "HTTP 502 Bad Gateway"),
    (503, "Service Unavailable", "text/plain", b"maintenance", [], SENT, True,
     "HTTP 503 Service Unavailable: maintenance"),
    (301, "Moved Permanently", "", b"", [], SENT, False, "HTTP 301 Moved Permanently"),
])
def test_classify_store_response(status, reason, content_type, body, stored, failed, transient, message):
    outcome = dicomweb.classify_store_response(status, reason, content_type, body, SENT, LABELS)
    assert sorted(outcome.stored) == sorted(stored) and sorted(outcome.failed) == sorted(failed)
    assert outcome.all_stored == (not failed)
    if failed:
        assert outcome.transient == transient
    assert outcome.message == message


def test_parse_store_response_warnings_and_odd_bodies():
    body = json.dumps([{"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [SR_UID]}, "00081196": {"vr": "US", "Value": [0xB000]}}]}}]).encode()
    parsed = dicomweb.parse_store_response("application/dicom+json; charset=utf-8", body)
    assert parsed.parsed and parsed.referenced == {SR_UID: 0xB000} and parsed.failed == {}
    outcome = dicomweb.classify_store_response(202, "Accepted", DJ, body, [SR_UID])
    assert outcome.all_stored and outcome.stored == {SR_UID: 0xB000}
    for content_type, odd in ((DJ, b""), (DJ, b"[1, 2]"), (DJ, b"\xff\xfe"), ("text/html", b"{}"),
                              (DJ, b'{"00081199": {"vr": "SQ"}}')):
        assert dicomweb.parse_store_response(content_type, odd).referenced == {}


def test_authorization_header_from_the_environment():
    basic = Destination(name="p", url="http://h/dw", auth="basic", credentials_env="CREDS")
    bearer = Destination(name="p", url="http://h/dw", auth="bearer", credentials_env="CREDS")
    assert dicomweb.authorization(Destination(name="p", url="http://h/dw"), {}) is None
    assert dicomweb.authorization(basic, {"CREDS": "u:p:w"}) == "Basic " + base64.b64encode(b"u:p:w").decode()
    assert dicomweb.authorization(bearer, {"CREDS": " tok.en-1 \n"}) == "Bearer tok.en-1"
    for destination, value in ((basic, None), (basic, ""), (basic, "no-colon-secret"), (basic, "u:line\nbreak"),
                               (bearer, "  "), (bearer, "two words"), (bearer, "t\u00f6ken")):
        with pytest.raises(dicomweb.CredentialsError) as info:
            dicomweb.authorization(destination, {} if value is None else {"CREDS": value})
        assert "CREDS" in str(info.value)
        assert not value or not value.strip() or value.strip() not in str(info.value)


def test_messages_never_carry_credentials():
    destination = Destination(name="p", url="http://h/dw", auth="basic", credentials_env="CREDS")
    client = dicomweb.DicomWebClient(destination, 1, environ={"CREDS": "alice:hunter2-secret"})
    header = base64.b64encode(b"alice:hunter2-secret").decode()
    assert client.redact(f"x hunter2-secret y Basic {header} alice:hunter2-secret") == "x *** y *** ***"
    assert dicomweb.public_url("https://bob:pw@pacs:8443/dw") == "https://***@pacs:8443/dw"
    # The config refuses such a url (above); a Destination built around it (model_construct skips
    # validation) is still never shown nor used with its password.
    in_url = Destination.model_construct(name="p", url="https://bob:pw-in-url@pacs/dw", auth="none",
                                         credentials_env=None, ae_title=None, host=None, port=None)
    assert dicomweb.where(in_url) == "p (https://***@pacs/dw)"
    with pytest.raises(ConfigError, match="credentials_env") as info:
        dicomweb.DicomWebClient(in_url, 1)
    assert "pw-in-url" not in str(info.value)
