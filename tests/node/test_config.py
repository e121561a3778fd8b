from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.config import load_settings
from node.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid():
    settings = load_settings("deploy/config.example.toml")
    assert settings.node.port == 11112
    assert settings.series.idle_seconds == 10
    assert settings.storage.resolved_database_url.startswith("sqlite:///")


def test_environment_overrides_file_and_cli_overrides_environment(tmp_path, monkeypatch):
    path = write(tmp_path, '[node]\nport = 104\nae_title = "FILE"\n')
    monkeypatch.setenv("MIGRAINE_NODE_NODE__PORT", "4242")
    monkeypatch.setenv("MIGRAINE_NODE_NODE__ALLOWED_CALLING_AETS", '["PHILIPS_MR1"]')
    settings = load_settings(path)
    assert settings.node.port == 4242
    assert settings.node.ae_title == "FILE"
    assert settings.node.allowed_calling_aets == ["PHILIPS_MR1"]
    assert load_settings(path, overrides={"node": {"port": 5555}}).node.port == 5555


def test_config_file_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRAINE_NODE_CONFIG", str(write(tmp_path, "[node]\nport = 2000\n")))
    assert load_settings().node.port == 2000


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('[node]\nae_title = "THIS_TITLE_IS_WAY_TOO_LONG"\n', {}, "[node] ae_title"),
        ('[node]\nallowed_calling_aets = ["OK", "BAD\\\\AE"]\n', {}, "[node] allowed_calling_aets"),
        ('[[destinations]]\nname = "pacs"\nae_title = "P"\nhost = "h"\nport = 0\n', {}, "[[destinations]] #1 port"),
        ('[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 1\n'
         '[[destinations]]\nname = "a"\nae_title = "Q"\nhost = "h"\nport = 2\n', {}, "destination names must be unique"),
        ('[model]\ndevice = "tpu"\n', {}, "[model] device"),
        ("[storage]\ndatabase_url = \"node.db\"\n", {}, "[storage] database_url"),
        ("", {"MIGRAINE_NODE_NODE__PORT": "abc"}, "MIGRAINE_NODE_NODE__PORT"),
        ("", {"MIGRAINE_NODE_NODES__PORT": "1"}, "unknown environment variable(s): MIGRAINE_NODE_NODES__PORT"),
    ],
)
def test_errors_name_the_key(tmp_path, monkeypatch, text, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert needle in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_config_is_found_from_flag_then_environment_then_default_location(tmp_path, monkeypatch):
    import node.config
    from node.config import resolve_config_path

    default = write(tmp_path, "[node]\nport = 3000\n")
    monkeypatch.setattr(node.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.delenv("MIGRAINE_NODE_CONFIG", raising=False)
    assert resolve_config_path(None) == (None, "no --config, no $MIGRAINE_NODE_CONFIG, no " + str(tmp_path / "absent.toml"))
    monkeypatch.setattr(node.config, "DEFAULT_CONFIG_PATH", default)
    assert resolve_config_path(None) == (default, "from default location")
    monkeypatch.setenv("MIGRAINE_NODE_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path(None) == (tmp_path / "env.toml", "from $MIGRAINE_NODE_CONFIG")
    assert resolve_config_path("given.toml") == (Path("given.toml"), "from --config")


def test_commands_say_which_config_they_use_on_stderr(tmp_path, monkeypatch, capsys):
    import node.config
    from node.cli import main

    monkeypatch.chdir(tmp_path)  # any folder: the default location does not depend on it
    monkeypatch.delenv("MIGRAINE_NODE_CONFIG", raising=False)
    from storage.db import make_engine, sqlite_url

    for data in ("data", "data2"):  # a node has run with each configuration: its database exists
        make_engine(sqlite_url(tmp_path / data / "node.db")).dispose()
    default = write(tmp_path, f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    monkeypatch.setattr(node.config, "DEFAULT_CONFIG_PATH", default)
    assert main(["jobs", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == []  # stdout stays clean for --json
    assert err.strip() == f"config: {default} (from default location)"

    monkeypatch.setattr(node.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setenv("MIGRAINE_NODE_STORAGE__DATA_DIR", str(tmp_path / "data2"))
    assert main(["status", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["queue_depth"] == 0
    assert err.startswith("config: built-in defaults (no --config")

    monkeypatch.setenv("MIGRAINE_NODE_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["jobs"]) == 2
    err = capsys.readouterr().err
    assert f"config: {tmp_path / 'missing.toml'} (from $MIGRAINE_NODE_CONFIG)" in err
    assert "config file not found" in err


def test_the_patient_key_variable_is_not_a_stray_setting(monkeypatch, tmp_path):
    """The research commands' key file variable shares the prefix; the node must start beside it."""
    from model.dataset import KEY_FILE_ENV
    from node.config import PATIENT_KEY_ENV, load_settings

    assert PATIENT_KEY_ENV == KEY_FILE_ENV
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "patient-key"))
    assert load_settings().node.port > 0
