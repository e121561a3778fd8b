"""Several acceptor processes on one port ([node] acceptors, SO_REUSEPORT): concurrent senders are
all served into one spool and database; a dead acceptor is restarted; nothing outlives serve."""

from __future__ import annotations

import os
import signal
import threading
import uuid

import pytest

from model.synth import write_classic_series
from tests.node.test_ingest_e2e import db_instances
from tests.node.test_supervision import _start_marked, children, cmdline, processes_marked
from tests.node.test_metrics import scrape, value
from tests.peers import free_port, storescu, wait_until


def acceptor_children(serve_pid: int) -> list[int]:
    return [p for p in children(serve_pid) if "spawn_main" in cmdline(p) and "resource_tracker" not in cmdline(p)]


@pytest.fixture(scope="module")
def four_series(tmp_path_factory):
    out = []
    for i in range(4):
        folder = tmp_path_factory.mktemp(f"acc{i}")
        out.append((folder, write_classic_series(folder, slices=30, rows=64, columns=64, seed=40 + i)))
    return out


def test_three_acceptors_serve_concurrent_senders_and_are_supervised(node_factory, four_series):
    marker = f"acceptors-{uuid.uuid4()}"
    node = node_factory(idle_seconds=1)
    metrics_port = free_port()
    node.config.write_text(node.config.read_text().replace("[node]\n", "[node]\nacceptors = 3\n")
                           + f"\n[metrics]\nport = {metrics_port}\n")
    _start_marked(node, marker)
    serve = node.proc.pid
    extra = wait_until(lambda: len(a := acceptor_children(serve)) == 2 and a, timeout=60,
                       what="two extra acceptor processes")
    # Listening, not only started: otherwise every connection would still go to serve.
    wait_until(lambda: node.log_text().count("(role acceptor) listening") >= 2, timeout=60,
               what="the extra acceptors to listen")

    results = {}

    def send(index: int) -> None:
        folder, _ = four_series[index]
        results[index] = storescu(folder, node.port, calling=f"SENDER{index}")

    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    assert all(r.returncode == 0 for r in results.values()), [r.stderr for r in results.values()]
    expected = {uid for _, series in four_series for uid in series.sop_instance_uids}
    assert db_instances(node) == expected == {p.stem for p in node.spool_files()}
    for _, series in four_series:
        wait_until(lambda s=series: (r := next((j for j in node.jobs() if j["series_instance_uid"]
                                                 == s.series_instance_uid), None)) and r["state"] != "receiving",
                   timeout=60, what="each series to complete")

    # serve's /metrics counts what every acceptor process received, not only its own share.
    _, samples = scrape(metrics_port)
    assert value(samples, "migraine_node_instances_received_total", outcome="new") == len(expected)
    assert value(samples, "migraine_node_associations_accepted_total") == 4

    # A dead acceptor is replaced; the port keeps serving, and the counts carry on.
    os.kill(extra[0], signal.SIGKILL)
    wait_until(lambda: len(a := acceptor_children(serve)) == 2 and extra[0] not in a, timeout=60,
               what="serve to restart the acceptor")
    assert storescu(four_series[0][0], node.port).returncode == 0
    _, samples = scrape(metrics_port)
    assert value(samples, "migraine_node_instances_received_total", outcome="new") == len(expected)
    assert value(samples, "migraine_node_instances_received_total", outcome="duplicate") == 30
    assert value(samples, "migraine_node_associations_accepted_total") == 5
    assert node.stop() == 0
    wait_until(lambda: not processes_marked(marker), timeout=30, what="every process of serve to end")
