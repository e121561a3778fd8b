"""`replay --from-pacs` against a real Orthanc: C-GET, and C-MOVE to our own AE title, received either by
the running node or, when none runs, by a temporary SCP on [node] port; and the errors an administrator
acts on (PACS does not know us, study not there, node refuses the PACS, DICOMweb destination)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelMove,
)

from model.synth import write_series
from node.config import Destination, Settings, load_settings
from node.errors import ConfigError, PeerError
from node.retrieve import retrieve_study
from node.scp import Ingest
from storage.db import make_engine
from storage.spool import Spool
from storage.store import JobStore
from tests.peers import NODE_AE, NodeProcess, OrthancProcess, free_port, storescu, wait_until

SLICES = 6  # per series; two series in the study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve-study")
    first = write_series(root / "s1", slices=SLICES, rows=32, columns=32, spacing=4.0, seed=31)
    second = write_series(root / "s2", slices=SLICES, rows=32, columns=32, spacing=4.0, seed=32,
                          study_instance_uid=first.study_instance_uid, series_description="T2W_TSE")
    return root, first, second


def start_pacs(root, study, **options) -> OrthancProcess:
    """Orthanc holding the study, with `options` added to its configuration."""
    pacs = OrthancProcess.create(root)
    path = pacs.root / "orthanc.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}, indent=2))
    pacs.start()
    try:
        for name in ("s1", "s2"):
            result = storescu(study[0] / name, pacs.dicom_port, called=pacs.aet)
            assert result.returncode == 0, result.stderr
    except BaseException:
        pacs.stop()
        raise
    return pacs


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, study):
    """One Orthanc for the module (its start and stop cost seconds); which modalities it knows is set per test."""
    pacs = start_pacs(tmp_path_factory.mktemp("orthanc"), study)
    yield pacs
    pacs.stop(kill=True)


@pytest.fixture
def own_pacs(tmp_path, study):
    """An Orthanc of the test's own, for configuration options that cannot change at run time."""
    started: list[OrthancProcess] = []

    def make(**options) -> OrthancProcess:
        started.append(start_pacs(tmp_path / f"orthanc{len(started)}", study, **options))
        return started[-1]

    yield make
    for pacs in started:
        pacs.stop(kill=True)


@pytest.fixture
def knows_node(pacs):
    """Register [node] as the move destination NODE_AE in Orthanc, as an administrator does (REST here, instead
    of "DicomModalities" in its configuration); forgotten after the test."""

    def register(port: int) -> None:
        pacs.request("PUT", "/modalities/node", {"AET": NODE_AE, "Host": "127.0.0.1", "Port": port})

    yield register
    pacs.request("DELETE", "/modalities/node")


class SpyIngest(Ingest):
    """The Ingest `replay --from-pacs` builds, counting what goes through this process."""

    calls = 0

    def receive(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls += 1
        return super().receive(*args, **kwargs)


@pytest.fixture
def local(tmp_path):
    """Settings and Ingest as `replay --from-pacs` would have them, for a node that is not running."""
    engines = []

    def make(port: int, pacs: OrthancProcess | None = None, retrieve: str = "move",
             **node) -> tuple[Settings, SpyIngest, JobStore]:
        settings = load_settings(overrides={
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, **node},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 1},
            "destinations": [] if pacs is None else [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                                      "port": pacs.dicom_port, "retrieve": retrieve}],
        })
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        engines.append(engine := make_engine(settings.storage.resolved_database_url))
        store = JobStore(engine)
        return settings, SpyIngest(Spool(settings.storage.spool_dir), store, 1), store

    yield make
    for engine in engines:
        engine.dispose()


def nothing_listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def assert_stored(store: JobStore, study, pacs_aet: str) -> None:
    for series in study[1:]:
        assert store.count_instances(series.series_instance_uid) == SLICES
        assert store.get_series(series.series_instance_uid).calling_ae_title == pacs_aet


def test_move_into_the_running_node(in_process_node, pacs, knows_node, local, study):
    """The node listens on [node] port: the PACS stores into it, the command only waits for the C-MOVE."""
    port = free_port()
    knows_node(port)
    node = in_process_node(node={"port": port})
    settings, ingest, _ = local(port, pacs)
    count = retrieve_study(settings.destinations[0], study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert count == 2 * SLICES  # the PACS's completed sub-operations
    assert ingest.calls == 0  # nothing came through this process
    assert_stored(node.store, study, pacs.aet)
    assert len(list(node.settings.storage.spool_dir.glob("*/*/*.dcm"))) == 2 * SLICES
    # The node's own tracker completes the series, as for any sender.
    wait_until(lambda: all(node.store.get_series(s.series_instance_uid).state != "receiving" for s in study[1:]),
               timeout=30, what="series completed by the running node")


def test_move_without_a_node_runs_a_temporary_scp(pacs, knows_node, local, study):
    port = free_port()
    knows_node(port)
    settings, ingest, store = local(port, pacs)
    count = retrieve_study(settings.destinations[0], study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert count == ingest.calls == 2 * SLICES  # each instance through this process's Ingest
    assert_stored(store, study, pacs.aet)
    assert len(list(settings.storage.spool_dir.glob("*/*/*.dcm"))) == 2 * SLICES
    assert nothing_listens(port)  # the temporary SCP is gone


def test_c_get_still_works(pacs, local, study):
    """Orthanc here knows no modality, and allows C-GET from anyone."""
    port = free_port()
    settings, ingest, store = local(port, pacs, retrieve="get")
    count = retrieve_study(settings.destinations[0], study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert count == ingest.calls == 2 * SLICES
    assert_stored(store, study, pacs.aet)


@pytest.mark.parametrize("moves_for_anyone", [False, True], ids=["unknown-aet-dropped", "moves-for-anyone"])
def test_pacs_that_does_not_know_our_ae_title(pacs, own_pacs, local, study, moves_for_anyone):
    """Orthanc drops the association of an AE title it does not know, or (when it moves for anyone) fails the
    move without a word; either way the message says what to register in the PACS."""
    if moves_for_anyone:
        pacs = own_pacs(DicomAlwaysAllowMove=True)
    port = free_port()
    settings, ingest, store = local(port, pacs)
    with pytest.raises(PeerError) as caught:
        retrieve_study(settings.destinations[0], study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    message = str(caught.value)
    assert "register this node in the PACS" in message, message
    assert f"AE title {NODE_AE}" in message and f"port {port}" in message, message
    assert ingest.calls == 0 and store.count_instances() == 0
    assert nothing_listens(port)


def test_study_the_pacs_does_not_hold(pacs, knows_node, local):
    port = free_port()
    knows_node(port)
    settings, ingest, _ = local(port, pacs)
    with pytest.raises(PeerError, match="holds no study with this UID"):
        retrieve_study(settings.destinations[0], "1.2.826.0.1.3680043.8.498.1", ingest, NODE_AE, settings=settings)


def test_node_that_refuses_the_pacs(pacs, knows_node, local, study):
    """The PACS knows us, but [node] allowed_calling_aets leaves it out: the temporary SCP saw it connect."""
    port = free_port()
    knows_node(port)
    settings, ingest, store = local(port, pacs, allowed_calling_aets=["SCANNER"])
    with pytest.raises(PeerError, match="allowed_calling_aets"):
        retrieve_study(settings.destinations[0], study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert store.count_instances() == 0


@pytest.fixture
def fake_pacs():
    """A pynetdicom Move SCP for what Orthanc does not answer: 0xA801, and sub-operations that fail."""
    servers = []

    def make(instances: list[Dataset] | None) -> Destination:
        ae = AE(ae_title="FAKEPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(MRImageStorage)

        def on_move(event):  # noqa: ANN001, ANN202
            if instances is None:
                yield None, None  # move destination unknown: pynetdicom answers 0xA801
                return
            yield "127.0.0.1", ports[event.move_destination.strip()]
            yield len(instances)
            for ds in instances:
                yield 0xFF00, ds

        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, on_move)])
        servers.append(server)
        return Destination(name="fake", ae_title="FAKEPACS", host="127.0.0.1", port=server.server_address[1],
                           retrieve="move")

    ports: dict[str, int] = {}
    make.ports = ports
    yield make
    for server in servers:
        server.shutdown()


def test_move_destination_unknown_and_failed_suboperations(fake_pacs, local, study):
    from pydicom import dcmread

    port = free_port()
    fake_pacs.ports[NODE_AE] = port
    settings, ingest, store = local(port)

    unknown = fake_pacs(None)
    with pytest.raises(PeerError, match=r"move destination MIGNODE unknown \(0xA801\): register this node") as caught:
        retrieve_study(unknown, study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert f"port {port}" in str(caught.value)

    good = [dcmread(p) for p in sorted((study[0] / "s1").iterdir())[:2]]
    broken = dcmread(sorted((study[0] / "s1").iterdir())[2])
    del broken.StudyInstanceUID  # our Ingest refuses it (0xC211)
    partial = fake_pacs([*good, broken])
    with pytest.raises(PeerError, match=r"1 of 3 instance\(s\) failed to reach MIGNODE \(2 stored\)"):
        retrieve_study(partial, study[1].study_instance_uid, ingest, NODE_AE, settings=settings)
    assert ingest.calls == 3 and store.count_instances() == 2
    assert nothing_listens(port)


def test_port_held_by_something_that_is_not_a_node(fake_pacs, local, study):
    """Bind fails but no DICOM node answers on [node] port: the PACS could not deliver to us; say so, send nothing."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings, ingest, _ = local(port)
        with pytest.raises(PeerError, match="no DICOM node answers there"):
            retrieve_study(fake_pacs([]), study[1].study_instance_uid, ingest, NODE_AE, timeout=1, settings=settings)


def test_dicomweb_destination_cannot_be_retrieved_from(local, study):
    settings, ingest, _ = local(free_port())
    web = Destination(name="web", url="http://127.0.0.1:8042/dicom-web")
    with pytest.raises(ConfigError, match=r"DICOMweb \(url\) destination.*needs a DICOM one"):
        retrieve_study(web, study[1].study_instance_uid, ingest, NODE_AE, settings=settings)


def node_config(root, port: int, pacs: OrthancProcess) -> NodeProcess:
    root.mkdir()
    config = root / "node.toml"
    config.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = {port}\nlog_level = "DEBUG"\n'
        f'[storage]\ndata_dir = "{root / "data"}"\nmin_free_disk_mb = 1\n'
        "[series]\nidle_seconds = 1\n[worker]\nprocesses = 0\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        'retrieve = "move"\n')
    return NodeProcess(config=config, data_dir=root / "data", port=port, log=root / "node.log")


def test_cli_replay_from_pacs_by_move(pacs, knows_node, study, tmp_path):
    """`migraine-node replay --from-pacs` with retrieve = "move": first with no node running (temporary SCP),
    then into a running `serve`; each time the study's series get a new job version."""
    _, first, second = study
    port = free_port()
    knows_node(port)
    node = node_config(tmp_path / "node", port, pacs)

    def replay(expected_version: int) -> None:
        cli = subprocess.run([sys.executable, "-m", "node.cli", "replay", "--from-pacs", "pacs",
                              first.study_instance_uid, "--config", str(node.config)],
                             check=False, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert f"retrieved {2 * SLICES} instance(s) of study {first.study_instance_uid} from pacs" in cli.stdout
        for series in (first, second):
            assert f"replay queued: series {series.series_instance_uid}" in cli.stdout
        rows = {r["series_instance_uid"]: r for r in node.jobs()}
        for series in (first, second):
            row = rows[series.series_instance_uid]
            assert row["instances"] == SLICES and row["version"] == expected_version, row

    replay(expected_version=2)  # ingested as version 1 by the temporary SCP, replayed as 2
    assert nothing_listens(port)
    node.start()
    try:
        replay(expected_version=3)
        assert f"association from {pacs.aet} ended" in node.log_text()  # the running node received the move
    finally:
        node.stop()
