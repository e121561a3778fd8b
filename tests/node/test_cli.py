"""Admin CLI against a real node: jobs/show/echo through main(argv)."""

from __future__ import annotations

import json

from node.cli import main
from tests.peers import free_port, storescu, wait_until

JSON_KEYS = {"series_instance_uid", "study_instance_uid", "series_description", "instances", "state", "reason",
             "updated_at"}


def test_jobs_show_and_echo(node_factory, small_series, capsys):
    series_dir, series = small_series
    node = node_factory(idle_seconds=1).start()
    assert storescu(series_dir, node.port).returncode == 0
    config = str(node.config)

    def listed(state):
        capsys.readouterr()
        assert main(["jobs", "--state", state, "--json", "--config", config]) == 0
        return json.loads(capsys.readouterr().out)

    [row] = wait_until(lambda: listed("skipped"), timeout=20, what="complete series, skipped by selection")
    assert JSON_KEYS <= row.keys()
    assert row["series_instance_uid"] == series.series_instance_uid and row["instances"] == 48
    assert listed("receiving") == []

    assert main(["jobs", "--config", config]) == 0
    table = capsys.readouterr().out
    assert series.series_instance_uid in table and "skipped" in table

    assert main(["show", series.series_instance_uid, "--json", "--config", config]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= shown.keys()
    assert shown["jobs"][0]["version"] == 1 and shown["jobs"][0]["state"] == "skipped"
    assert "need at least 100" in shown["reason"]
    assert main(["show", "1.2.3.4.5", "--config", config]) == 1
    assert "no series" in capsys.readouterr().err

    assert main(["echo", f"MIGNODE@127.0.0.1:{node.port}", "--config", config]) == 0
    assert "success" in capsys.readouterr().out
    assert main(["echo", f"MIGNODE@127.0.0.1:{free_port()}", "--timeout", "3", "--config", config]) == 1
    assert "not reachable" in capsys.readouterr().err
    assert main(["echo", "WRONG@127.0.0.1:%d" % node.port, "--config", config]) == 1
    assert "rejected" in capsys.readouterr().err
    assert main(["echo", "no-port-here", "--config", config]) == 1
    assert "AE@HOST:PORT" in capsys.readouterr().err


def test_read_commands_never_create_a_database(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n')
    for argv in (["status"], ["status", "--json"], ["jobs"], ["show", "1.2.3.4"]):
        assert main([*argv, "--config", str(config)]) == 1
        captured = capsys.readouterr()
        assert f"no database at {(data / 'node.db').resolve()}" in captured.err
        assert "has not run with this configuration (check --config)" in captured.err
        assert "queue depth" not in captured.out
        assert list(data.iterdir()) == []


def test_status_without_config_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MIGRAINE_NODE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 1
    assert "no database at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
