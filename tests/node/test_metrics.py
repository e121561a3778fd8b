"""node/metrics.py: /metrics scraped while a real node receives, /healthz when the database or the workers go,
and no patient data in what either says."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

import node.service
from node.metrics import DEMO_MODEL_DIR
from tests.peers import free_port, storescu, wait_until


@pytest.fixture(scope="module")
def t1_100(tmp_path_factory):
    """100 slices: enough for selection to queue it (small_series, 48 slices, is skipped)."""
    from model.synth import write_series

    out = tmp_path_factory.mktemp("t1-100")
    return out, write_series(out, slices=100, rows=32, columns=32, spacing=1.5, seed=11)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> tuple[str, dict]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = (sample.value, sample.labels)
    return body, samples


def value(samples: dict, name: str, **labels) -> float | None:
    found = samples.get((name, tuple(sorted(labels.items()))))
    return None if found is None else found[0]


def patient_strings(folder) -> list[str]:  # noqa: ANN001
    ds = pydicom.dcmread(min(folder.iterdir()), stop_before_pixels=True)
    strings = [str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)]
    assert all(strings) and "SYNTHETIC^PHANTOM" in strings
    return strings


def test_metrics_move_during_a_run_and_name_no_patient(in_process_node, small_series, t1_100):
    port = free_port()
    svc = in_process_node(metrics={"port": port})
    assert http_get(port, "/healthz") == (200, "ok\n")  # no worker processes in this role's config: database only
    _, before = scrape(port)
    assert value(before, "migraine_node_instances_received_total", outcome="new") == 0
    assert value(before, "migraine_node_database_up") == 1

    small_dir, small = small_series
    big_dir, big = t1_100
    for folder in (small_dir, big_dir):
        sent = storescu(folder, svc.port)
        assert sent.returncode == 0, sent.stderr
    refused = storescu(min(small_dir.iterdir()), svc.port, called="NOT_OUR_AE")
    assert refused.returncode != 0
    wait_until(lambda: svc.store.get_series(small.series_instance_uid).state == "skipped", timeout=30,
               what="the 48-slice series skipped")
    wait_until(lambda: svc.store.get_series(big.series_instance_uid).state == "queued", timeout=30,
               what="the 100-slice series queued")

    body, samples = scrape(port)
    assert value(samples, "migraine_node_instances_received_total", outcome="new") == 48 + 100
    assert value(samples, "migraine_node_instances_received_total", outcome="refused") == 0
    assert value(samples, "migraine_node_associations_accepted_total") >= 2
    assert value(samples, "migraine_node_associations_refused_total", reason="called_ae_title") == 1
    assert value(samples, "migraine_node_associations_refused_total", reason="network") == 0
    assert value(samples, "migraine_node_series", state="queued") == 1
    assert value(samples, "migraine_node_series", state="skipped") == 1
    assert value(samples, "migraine_node_series", state="receiving") == 0
    assert value(samples, "migraine_node_queue_depth") == 1
    assert value(samples, "migraine_node_deliveries", state="pending") == 0
    assert value(samples, "migraine_node_oldest_undelivered_result_age_seconds") == 0
    info = next(labels for (name, _), (_, labels) in samples.items() if name == "migraine_node_info")
    assert info["model_id"] == "synthetic demo (not built)" and info["role"] == "all" and info["version"]
    assert value(samples, "migraine_node_worker_processes_configured") == 0  # so /healthz does not ask for one
    assert "migraine_node_stage_duration_seconds" in body  # declared; tests/node/test_audit_cli.py sees it observed
    # Labels hold outcomes, reasons and states, never patients, UIDs or addresses.
    for text in (*patient_strings(small_dir), small.series_instance_uid, small.study_instance_uid, "127.0.0.1",
                 "SCANNER"):
        assert text not in body
    assert http_get(port, "/nothing")[0] == 404


def test_healthz_fails_while_the_database_refuses_connections(in_process_node, postgres_server):
    import psycopg

    url = postgres_server.create_database("health")
    name = url.rsplit("/", 1)[1]
    port = free_port()
    in_process_node(metrics={"port": port}, storage={"database_url": url})
    assert http_get(port, "/healthz") == (200, "ok\n")
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
                         autocommit=True) as admin:
        # The database goes away for the node: new connections refused, the open ones ended.
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            status, body = http_get(port, "/healthz")
            assert status == 503 and body.startswith("database: ") and "OperationalError" in body, body
            _, samples = scrape(port)
            assert value(samples, "migraine_node_database_up") == 0
            assert value(samples, "migraine_node_instances_received_total", outcome="new") == 0  # the rest still there
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert http_get(port, "/healthz") == (200, "ok\n")  # back, without a restart


def test_healthz_fails_when_no_worker_process_is_alive(in_process_node, tiny_checkpoint, monkeypatch):
    # The supervisor would restart the worker within seconds; here it looks only when the test asks it to.
    monkeypatch.setattr(node.service, "SUPERVISE_SECONDS", 3600.0)
    port = free_port()
    svc = in_process_node(metrics={"port": port}, worker={"processes": 1},
                          model={"checkpoint": str(tiny_checkpoint), "device": "cpu"})
    (pid,) = svc.worker_pids()
    assert http_get(port, "/healthz") == (200, "ok\n")
    _, samples = scrape(port)
    assert value(samples, "migraine_node_worker_processes_alive") == 1
    assert value(samples, "migraine_node_worker_processes_configured") == 1
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not svc.worker_pids(), timeout=10, what="the worker gone")
    status, body = http_get(port, "/healthz")
    assert status == 503 and body == "workers: none of the 1 classification worker process(es) is alive\n"
    _, samples = scrape(port)
    assert value(samples, "migraine_node_worker_processes_alive") == 0


def test_a_connection_from_outside_allowed_networks_is_counted_and_audited(in_process_node, small_series):
    from storage.audit import events

    port = free_port()
    svc = in_process_node(metrics={"port": port}, node={"allowed_networks": ["192.0.2.0/24"]})
    refused = storescu(min(small_series[0].iterdir()), svc.port)
    assert refused.returncode != 0
    wait_until(lambda: value(scrape(port)[1], "migraine_node_associations_refused_total", reason="network") == 1,
               timeout=10, what="the refusal counted")
    _, samples = scrape(port)
    assert value(samples, "migraine_node_associations_accepted_total") == 0
    assert value(samples, "migraine_node_instances_received_total", outcome="new") == 0
    (row,) = events(svc.engine)
    assert (row["kind"], row["actor"], row["address"], row["detail"]) == (
        "association_refused", None, "127.0.0.1", {"reason": "network"})


def test_an_audit_event_that_cannot_be_written_is_counted_and_never_raised(tmp_path, caplog):
    from sqlalchemy import create_engine

    from node.config import load_settings
    from node.metrics import NodeMetrics
    from node.observer import Observer
    from storage.db import make_engine, sqlite_url

    engine = make_engine(sqlite_url(tmp_path / "node.db"))
    metrics = NodeMetrics(engine, load_settings(overrides={"storage": {"data_dir": str(tmp_path)}}))
    no_tables = create_engine(sqlite_url(tmp_path / "empty.db"))
    Observer(no_tables, "MIGNODE", metrics).connection_refused("192.0.2.7")
    assert metrics.registry.get_sample_value("migraine_node_audit_write_errors_total") == 1
    assert metrics.registry.get_sample_value("migraine_node_associations_refused_total", {"reason": "network"}) == 1
    assert "could not write 1 audit event(s) (association_refused)" in caplog.text
    no_tables.dispose()
    engine.dispose()


def test_metrics_port_in_use_fails_the_start(in_process_node):
    import socket

    from node.errors import NodeError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(NodeError, match=r"\[metrics\] cannot listen"):
            in_process_node(metrics={"port": taken.getsockname()[1]})


def test_the_demo_model_directory_is_model_demos():
    from pathlib import Path

    from model.demo import default_demo_dir

    assert default_demo_dir(Path("data")) == Path("data") / DEMO_MODEL_DIR
