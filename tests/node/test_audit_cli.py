"""A real run seen by the administrator: the audit trail of each kind and `migraine-node audit`, and the
metrics of classification and delivery. No patient data in either."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage  # type: ignore[attr-defined]

from node.cli import main
from node.config import load_settings
from node.service import NodeService
from node.worker import Worker
from tests.peers import NODE_AE, free_port, storescu, wait_until


@pytest.fixture(scope="module")
def t1_100(tmp_path_factory):
    from model.synth import write_series

    out = tmp_path_factory.mktemp("t1-100")
    return out, write_series(out, slices=100, rows=32, columns=32, spacing=1.5, seed=12)


class Pacs:
    """A real pynetdicom storage SCP that stores SRs."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:  # noqa: ANN001
        self.received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def node(tmp_path, tiny_checkpoint):
    """NodeService from a config file (the CLI reads the same file), with a stand-in PACS; no worker processes:
    the test classifies in this process."""
    pacs = Pacs()
    config = tmp_path / "node.toml"
    metrics_port = free_port()
    config.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_disk_mb = 1\n'
        "[series]\nidle_seconds = 1\nmax_wait_seconds = 60\n"
        "[worker]\nprocesses = 0\n"
        f'[model]\ncheckpoint = "{tiny_checkpoint}"\ndevice = "cpu"\n'
        "[export]\nretry_initial_seconds = 0.1\nretry_max_seconds = 0.2\n"
        f"[metrics]\nport = {metrics_port}\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
    )
    svc = NodeService(load_settings(config), str(config))
    svc.start()
    try:
        yield svc, config, pacs, metrics_port
    finally:
        svc.stop()
        pacs.close()


def _samples(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        body = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def test_a_run_leaves_an_audit_trail_of_each_kind_and_the_metrics_of_its_stages(node, t1_100, monkeypatch, capsys):
    svc, config, pacs, metrics_port = node
    folder, series = t1_100
    uid = series.series_instance_uid
    assert storescu(folder, svc.port).returncode == 0
    assert storescu(min(folder.iterdir()), svc.port, called="NOT_OUR_AE").returncode != 0
    wait_until(lambda: svc.store.get_series(uid).state == "queued", timeout=30, what="the series queued")
    assert Worker(svc.settings, svc.queue).run_once()
    view = wait_until(lambda: (v := svc.store.get_series(uid)).state == "delivered" and v, timeout=30,
                      what="the SR delivered")
    assert pacs.received == [view.sr_sop_instance_uid]

    samples = _samples(metrics_port)
    assert samples[("migraine_node_deliveries_total", (("destination", "pacs"), ("result", "sent")))] == 1
    assert samples[("migraine_node_deliveries_total", (("destination", "pacs"), ("result", "retry")))] == 0
    for stage in ("load", "assemble", "preprocess", "inference", "report", "write", "queue_wait"):
        assert samples[("migraine_node_stage_duration_seconds_count", (("stage", stage),))] == 1, stage
    assert samples[("migraine_node_series", (("state", "delivered"),))] == 1
    assert samples[("migraine_node_oldest_undelivered_result_age_seconds", ())] == 0
    assert _samples(metrics_port)[("migraine_node_stage_duration_seconds_count", (("stage", "inference"),))] == 1

    # Commands, run by "alice" through sudo.
    monkeypatch.setenv("SUDO_USER", "alice")
    assert main(["resend", uid, "--config", str(config)]) == 0
    assert main(["replay", uid, "--config", str(config)]) == 0
    assert main(["purge", "--config", str(config)]) == 0
    capsys.readouterr()

    listed = subprocess.run([sys.executable, "-m", "node.cli", "audit", "--json", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    assert set(by_kind) == {"association_accepted", "association_refused", "study_received", "object_sent",
                            "resend", "replay", "purge"}
    accepted = by_kind["association_accepted"]
    assert {(r["actor"], r["address"]) for r in accepted} == {("SCANNER", "127.0.0.1")}
    (refused,) = by_kind["association_refused"]
    assert (refused["actor"], refused["address"]) == ("SCANNER", "127.0.0.1")
    assert refused["detail"] == {"reason": "called_ae_title", "called_ae_title": "NOT_OUR_AE"}
    (study,) = by_kind["study_received"]
    assert (study["study_instance_uid"], study["series_instance_uid"], study["actor"]) == (
        series.study_instance_uid, uid, "SCANNER")
    assert study["detail"] == {"series": {uid: 100}, "instances": 100, "association": "released"}
    (sent,) = by_kind["object_sent"]  # the destination takes the SR only
    assert (sent["sop_instance_uid"], sent["destination"], sent["address"], sent["actor"]) == (
        view.sr_sop_instance_uid, "pacs", f"127.0.0.1:{pacs.port}", NODE_AE)
    assert (sent["study_instance_uid"], sent["series_instance_uid"]) == (series.study_instance_uid, uid)
    assert sent["detail"]["kind"] == "sr" and sent["detail"]["status"] == 0
    for kind in ("resend", "replay", "purge"):
        (row,) = by_kind[kind]
        assert row["actor"].startswith("alice as ") and row["actor"].endswith(" (sudo)"), row
    assert by_kind["resend"][0]["series_instance_uid"] == uid
    assert by_kind["resend"][0]["detail"] == {"destinations": ["pacs"]}
    assert by_kind["replay"][0]["series_instance_uid"] == uid and by_kind["replay"][0]["detail"] == {"series": [uid]}
    assert by_kind["purge"][0]["detail"]["purged"] == 0
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)

    # The text form, filtered; nothing of the patient in either form.
    assert main(["audit", "--kind", "replay", "--kind", "resend", "--since", "1h", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) == 2 and "resend" in lines[0] and "replay" in lines[1] and f"series={uid}" in lines[1]
    ds = pydicom.dcmread(min(folder.iterdir()), stop_before_pixels=True)
    for secret in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)):
        assert secret and secret not in listed.stdout and secret not in text
    assert main(["audit", "--since", "2999-01-01", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "no audit events since 2999-01-01\n"
    assert main(["audit", "--since", "yesterday", "--config", str(config)]) == 2
    assert "--since: 'yesterday' is neither a duration" in capsys.readouterr().err
