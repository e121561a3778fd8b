from __future__ import annotations

import os

# OpenMP threads that sleep rather than spin while they wait (read when torch loads; inherited by the
# nodes the tests start): on two cores shared by the test process, a node and its worker, spinning
# threads starved each other (a tiny forward pass took 1 s instead of 0.04 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.network import build_network
from model.preprocess import InputSpec
from model.synth import SyntheticSeries, write_classic_series, write_series
from tests.peers import NodeProcess, free_port

@pytest.fixture(autouse=True, scope="session")
def _no_home_patient_key(tmp_path_factory):
    """No test may create or read the site's patient-pseudonym key in the home directory; a test
    module that needs a key of its own sets the variable for its scope."""
    key_file = tmp_path_factory.getbasetemp() / "patient-key"
    key_file.write_bytes(bytes(range(32)))  # fixed: a patient split depends on the key, a test must not
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIGRAINE_NODE_PATIENT_KEY_FILE", str(key_file))
        yield


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch, tmp_path_factory):
    """A machine's /etc/migraine-node/config.toml must not leak into tests that pass no --config."""
    import node.config

    monkeypatch.setattr(node.config, "DEFAULT_CONFIG_PATH", tmp_path_factory.getbasetemp() / "no-such-config.toml")


@pytest.fixture(autouse=True)
def _restore_global_dicom_settings():
    """NodeService switches pydicom validation off process-wide (the ingest hot path);
    put it back so each test sees the library defaults."""
    import pydicom.config
    from pynetdicom import _config as pynetdicom_config

    saved = (pydicom.config.settings.reading_validation_mode, pydicom.config.settings.writing_validation_mode,
             pynetdicom_config.STORE_SEND_CHUNKED_DATASET)
    yield
    (pydicom.config.settings.reading_validation_mode, pydicom.config.settings.writing_validation_mode,
     pynetdicom_config.STORE_SEND_CHUNKED_DATASET) = saved


TINY_SPEC = InputSpec(spacing=(8.0, 8.0, 8.0), shape=(24, 32, 32))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Random-weight ResNet18 at a tiny input spec: fast, and honest about being untrained."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out, build_network("resnet18"), name="test-random", architecture="resnet18",
                    input_spec=TINY_SPEC, cutoff=0.5, synthetic=True, training={"note": "random weights"})
    return out


@pytest.fixture(scope="session")
def t1_series(tmp_path_factory) -> tuple[Path, SyntheticSeries]:
    """The paper's acquisition size: 170 sagittal slices of 256x256."""
    out = tmp_path_factory.mktemp("t1-170")
    return out, write_classic_series(out, slices=170, rows=256, columns=256)


@pytest.fixture(scope="session")
def small_series(tmp_path_factory) -> tuple[Path, SyntheticSeries]:
    out = tmp_path_factory.mktemp("t1-small")
    return out, write_classic_series(out, slices=48, rows=64, columns=64, seed=7)


# The source series a result (SR, result image) is built from: one classic, one multi-frame
# (Legacy Converted Enhanced MR) of the same size, shared by tests/node/test_report.py and
# tests/node/test_result_image.py. Read them; never write to their files.


@pytest.fixture(scope="session")
def source_classic(tmp_path_factory) -> SyntheticSeries:
    return write_series(tmp_path_factory.mktemp("classic"), slices=24, rows=32, columns=32, spacing=4.0, seed=7)


@pytest.fixture(scope="session")
def source_enhanced(tmp_path_factory) -> SyntheticSeries:
    return write_series(
        tmp_path_factory.mktemp("enhanced"), slices=24, rows=32, columns=32, spacing=4.0, enhanced=True, seed=8
    )


@pytest.fixture
def node_factory(tmp_path):
    started: list[NodeProcess] = []

    def make(**kwargs) -> NodeProcess:
        root = tmp_path / f"node{len(started)}"
        root.mkdir()
        node = NodeProcess.write_config(root, **kwargs)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()



@pytest.fixture
def in_process_node(tmp_path):
    """NodeService (SCP + scheduler, no worker process) on a free loopback port; stopped after the test."""
    from node.config import deep_merge, load_settings
    from node.service import NodeService

    started = []

    def make(**overrides) -> NodeService:
        base = {
            "node": {"ae_title": "MIGNODE", "host": "127.0.0.1", "port": free_port()},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 1},
            "series": {"idle_seconds": 1, "max_wait_seconds": 60},
            "worker": {"processes": 0},
        }
        svc = NodeService(load_settings(overrides=deep_merge(base, overrides)))
        svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/pg.py); each test makes its own database."""
    from tests.pg import PostgresServer, _children_of_data_dir

    server = PostgresServer.start_new()
    try:
        yield server
    finally:
        root = server.root
        server.stop()
        assert not _children_of_data_dir(root), "PostgreSQL processes left running after stop"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The job database of a core storage test: a fresh SQLite file, and a fresh database on a real
    PostgreSQL server (the same tests run against both engines)."""
    if request.param == "sqlite":
        from storage.db import sqlite_url

        return sqlite_url(tmp_path / "node.db")
    return request.getfixturevalue("postgres_server").create_database()
