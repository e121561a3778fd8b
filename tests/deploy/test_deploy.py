"""deploy/: the hardened systemd unit, install.sh, the container image and the site-trial compose file.

Nothing is built or started: the unit goes through `systemd-analyze verify` when that exists,
install.sh is syntax-checked and run in staging mode (--destdir, no venv) into a temporary root,
and the Containerfile and compose.yaml are checked as text and (with PyYAML) as data.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import DEFAULT_CONFIG_PATH, Destination, NodeSection, load_settings
from node.service import WORKER_STOP_SECONDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "migraine-node.service"
BIN = "/opt/migraine-node/.venv/bin/migraine-node"
DATA_DIR = "/var/lib/migraine-node"


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=True, interpolation=None)  # strict: no key set twice
    unit.optionxform = str
    unit.read(UNIT)
    return unit


# ---- the systemd unit ------------------------------------------------------------------------

def test_unit_is_hardened():
    service = _unit()["Service"]
    expected = {
        "User": "migraine-node",
        "Group": "migraine-node",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "StateDirectory": "migraine-node",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "SystemCallArchitectures": "native",
        "Restart": "on-failure",
        "RestrictSUIDSGID": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictNamespaces": "true",
        "LockPersonality": "true",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["ReadWritePaths"].split() == [DATA_DIR]
    assert service["ExecStart"] == f"{BIN} serve --config {DEFAULT_CONFIG_PATH}"
    assert int(service["TimeoutStopSec"]) >= WORKER_STOP_SECONDS + 15
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_never_upgrades_the_schema_itself():
    """Schema upgrades are an explicit administrator step (after a backup), not part of a start."""
    service = _unit()["Service"]
    execs = " ".join(v for k, v in service.items() if k.startswith("Exec"))
    assert "db upgrade" not in execs and "db" not in execs.split()
    assert "migraine-node db upgrade" in UNIT.read_text(encoding="utf-8")  # documented in its comments


def test_unit_and_example_config_agree_on_the_data_directory():
    settings = load_settings(DEPLOY / "config.example.toml")
    assert str(settings.storage.data_dir) == DATA_DIR
    # StateDirectory=migraine-node is /var/lib/migraine-node: systemd creates it, owned by the user.
    assert f"/var/lib/{_unit()['Service']['StateDirectory']}" == DATA_DIR


def _verify_stderr(unit_path: Path) -> tuple[int, str]:
    result = subprocess.run(["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True,
                            timeout=120, cwd=unit_path.parent)
    return result.returncode, result.stderr


def _runnable_copy(tmp_path: Path, text: str, name: str = "migraine-node.service") -> Path:
    """The unit with its executable replaced by one that exists here (verify checks it), all else kept."""
    true = shutil.which("true") or "/bin/true"
    path = tmp_path / name
    path.write_text(text.replace(BIN, true), encoding="utf-8")
    return path


def _problems(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if name in line or re.search(r"Unknown|ignoring|Invalid|Failed to parse|bad", line, re.IGNORECASE)]


@pytest.fixture
def systemd_analyze(tmp_path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text(f"[Service]\nExecStart={shutil.which('true') or '/bin/true'}\n", encoding="utf-8")
    rc, err = _verify_stderr(probe)
    if rc != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {err.strip()[:200]}")


def test_unit_passes_systemd_analyze_verify(systemd_analyze, tmp_path):
    path = _runnable_copy(tmp_path, UNIT.read_text(encoding="utf-8"))
    rc, err = _verify_stderr(path)
    assert rc == 0, err
    assert _problems(err, path.name) == [], err


def test_verify_check_notices_a_bad_directive(systemd_analyze, tmp_path):
    """The check above can fail: a misspelt or misplaced directive is reported."""
    text = UNIT.read_text(encoding="utf-8").replace("ProtectSystem=strict", "ProtectSystm=strict")
    path = _runnable_copy(tmp_path, text)
    _rc, err = _verify_stderr(path)
    assert any("ProtectSystm" in line for line in _problems(err, path.name)), err


def test_unit_exposure_is_low(systemd_analyze, tmp_path):
    path = _runnable_copy(tmp_path, UNIT.read_text(encoding="utf-8"))
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    if result.returncode != 0 and match is None:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {result.stderr.strip()[:200]}")
    assert match, result.stdout[-2000:]
    assert float(match[1]) <= 3.0, result.stdout  # 10 = unprotected; "OK" is below 4.5


# ---- install.sh --------------------------------------------------------------------------------

def test_install_sh_is_valid_bash():
    script = DEPLOY / "install.sh"
    assert os.access(script, os.X_OK), "deploy/install.sh must be executable"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout


def _stage(destdir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PIP_ARGS")}
    return subprocess.run([str(DEPLOY / "install.sh"), "--destdir", str(destdir), "--skip-venv"], env=env,
                          capture_output=True, text=True, timeout=120, cwd="/")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_sh_stages_an_installation_and_is_idempotent(tmp_path):
    user_existed = subprocess.run(["getent", "passwd", "migraine-node"], capture_output=True).returncode == 0
    root = tmp_path / "root"
    first = _stage(root)
    assert first.returncode == 0, first.stderr

    config = root / "etc/migraine-node/config.toml"
    assert config.read_bytes() == (DEPLOY / "config.example.toml").read_bytes()
    assert _mode(config) == 0o640
    assert _mode(root / "etc/migraine-node") == 0o750
    assert _mode(root / "etc/migraine-node/environment") == 0o640
    assert _mode(root / DATA_DIR.lstrip("/")) == 0o700
    unit = root / "etc/systemd/system/migraine-node.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    assert (root / "opt/migraine-node/docs/conformance.md").is_file()
    assert not (root / "opt/migraine-node/.venv").exists()  # --skip-venv
    for step in (f"config check {DEFAULT_CONFIG_PATH}", "db upgrade", "systemctl enable --now migraine-node"):
        assert step in first.stdout, first.stdout

    # Again, after an administrator edited the configuration: nothing they own is replaced.
    config.write_text(config.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    (root / "etc/migraine-node/environment").write_text("TOKEN=x\n", encoding="utf-8")
    second = _stage(root)
    assert second.returncode == 0, second.stderr
    assert config.read_text(encoding="utf-8").endswith("# edited\n")
    assert (root / "etc/migraine-node/environment").read_text(encoding="utf-8") == "TOKEN=x\n"
    assert "kept /etc/migraine-node/config.toml" in second.stdout
    assert "unchanged" in second.stdout
    # Staging creates no user, whoever runs it.
    user_exists = subprocess.run(["getent", "passwd", "migraine-node"], capture_output=True).returncode == 0
    assert user_exists == user_existed


def test_install_sh_refuses_an_unknown_argument(tmp_path):
    result = subprocess.run([str(DEPLOY / "install.sh"), "--destdir", str(tmp_path), "--frobnicate"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument: --frobnicate" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="as root it would really install")
def test_install_sh_needs_root_for_a_real_install():
    result = subprocess.run([str(DEPLOY / "install.sh"), "--skip-venv"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "run as root" in result.stderr


# ---- Containerfile ------------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        logical.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def test_containerfile_runs_as_non_root_with_a_data_volume_and_a_healthcheck():
    instructions = _instructions(DEPLOY / "Containerfile")
    kinds = [k for k, _ in instructions]
    users = [args for k, args in instructions if k == "USER"]
    assert users, "no USER: the node would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    volumes = [args for k, args in instructions if k == "VOLUME"]
    assert any(DATA_DIR in json.loads(v) if v.startswith("[") else DATA_DIR in v.split() for v in volumes)
    assert any(args.split() == [str(NodeSection().port)] for k, args in instructions if k == "EXPOSE")
    (health,) = [args for k, args in instructions if k == "HEALTHCHECK"]
    assert "CMD migraine-node echo" in health
    defaults = NodeSection()
    assert f"{defaults.ae_title}}}@127.0.0.1:${{MIGRAINE_NODE_NODE__PORT:-{defaults.port}}}" in health
    (cmd,) = [args for k, args in instructions if k == "CMD"]
    assert json.loads(cmd) == ["migraine-node", "serve", "--config", str(DEFAULT_CONFIG_PATH)]
    copies = [args for k, args in instructions if k == "COPY"]
    assert f"deploy/config.example.toml {DEFAULT_CONFIG_PATH}" in copies
    # The image's config writes where the volume is.
    assert str(load_settings(DEPLOY / "config.example.toml").storage.data_dir) == DATA_DIR


# ---- compose.yaml -------------------------------------------------------------------------------

def _load_yaml(path: Path) -> dict | None:
    """compose.yaml as data: with PyYAML here, else with a python3 on PATH that has it, else None."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    for python in {shutil.which("python3"), shutil.which("python")} - {None, sys.executable}:
        result = subprocess.run([python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                                input=path.read_text(encoding="utf-8"), capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            return json.loads(result.stdout)
    return None


def _service_blocks(text: str) -> dict[str, str]:
    """Minimal structure without a YAML parser: each service's lines under the top-level `services:`."""
    blocks: dict[str, list[str]] = {}
    inside, name = False, None
    for line in text.splitlines():
        if re.match(r"^\S", line):
            inside = line.startswith("services:")
            name = None
            continue
        match = re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line)
        if inside and match:
            name = match[1]
            blocks[name] = []
        elif inside and name:
            blocks[name].append(line)
    return {k: "\n".join(v) for k, v in blocks.items()}


def test_compose_file_structure():
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    assert "\t" not in text
    blocks = _service_blocks(text)
    assert {"node", "postgres", "orthanc"} <= set(blocks)
    for name in ("node", "postgres", "orthanc"):
        assert re.search(r"^    healthcheck:\n(      #.*\n)*      test: ", blocks[name], re.MULTILINE), name
    assert re.search(r"^    image: postgres:15\b", blocks["postgres"], re.MULTILINE)
    assert re.search(r"^    image: orthancteam/orthanc:", blocks["orthanc"], re.MULTILINE)
    assert "postgresql+psycopg://" in blocks["node"]
    assert re.search(r"^volumes:\n(  \S+:\n)+", text, re.MULTILINE)


def test_compose_file_as_data():
    compose = _load_yaml(DEPLOY / "compose.yaml")
    if compose is None:
        pytest.skip("no YAML parser (PyYAML) here or on PATH; test_compose_file_structure checked the text")
    services = compose["services"]
    assert {"node", "postgres", "orthanc"} <= set(services)
    for name in ("node", "postgres", "orthanc"):
        assert services[name]["healthcheck"]["test"], name

    node = services["node"]
    assert node["build"] == {"context": "..", "dockerfile": "deploy/Containerfile"}
    assert (DEPLOY / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == DEPLOY / "Containerfile"
    assert node["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                  "orthanc": {"condition": "service_healthy"}}
    assert int(node["stop_grace_period"].rstrip("s")) >= WORKER_STOP_SECONDS + 15
    env = node["environment"]
    url = env["MIGRAINE_NODE_STORAGE__DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://migraine:") and url.endswith("@postgres:5432/migraine")
    named = {v.split(":")[0]: v.split(":")[1] for v in node["volumes"]}
    assert named["node-data"] == DATA_DIR and "node-data" in compose["volumes"]
    health = node["healthcheck"]["test"]
    assert health[:2] == ["CMD", "migraine-node"] and "echo" in health

    # The destination is valid for the node and points at the Orthanc service's DICOM AE.
    (destination,) = [Destination(**d) for d in json.loads(env["MIGRAINE_NODE_DESTINATIONS"])]
    orthanc = services["orthanc"]
    assert destination.host == "orthanc"
    assert destination.ae_title == orthanc["environment"]["ORTHANC__DICOM_AET"]
    assert destination.port == int(orthanc["environment"]["ORTHANC__DICOM_PORT"])
    # ...and Orthanc knows the node by the AE title, host and port it listens on.
    (known,) = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"]).values()
    assert (known["AET"], known["Host"], known["Port"]) == (NodeSection().ae_title, "node", NodeSection().port)
    assert services["postgres"]["image"] == "postgres:15"
    assert services["orthanc"]["image"].startswith("orthancteam/orthanc:")
    for volume in ("postgres-data", "orthanc-data"):
        assert volume in compose["volumes"]
    # No default passwords.
    assert "${POSTGRES_PASSWORD:?" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert "${POSTGRES_PASSWORD:?" in url
