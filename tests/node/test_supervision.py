"""Process supervision: workers end with `serve`, `serve` restarts dead workers,
start-up failures are one line with nothing left running, systemd's stop timeout."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from node.config import load_settings
from node.errors import ConfigError
from node.service import WORKER_STOP_SECONDS, check_model
from tests.peers import NodeProcess, free_port, storescu, wait_until

ROOT = Path(__file__).resolve().parents[2]


# ---- /proc helpers ------------------------------------------------------------
def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    state = _status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def children(pid: int) -> list[int]:
    return [p for p in _pids() if _status(p).get("PPid", "").strip() == str(pid) and alive(p)]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_children(serve_pid: int) -> list[int]:
    """Classification workers of `serve` (multiprocessing spawn children, not its resource tracker)."""
    return [p for p in children(serve_pid) if "spawn_main" in cmdline(p) and "resource_tracker" not in cmdline(p)]


def processes_marked(marker: str) -> list[int]:
    """Live processes whose environment or command line carries `marker` (spawned children inherit both)."""
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""
        if (marker.encode() in environ or marker in cmdline(pid)) and alive(pid):
            found.append(pid)
    return found


def db_rows(node: NodeProcess, sql: str) -> list[tuple]:
    db = node.data_dir / "node.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def assert_no_instance_lost(node: NodeProcess, acknowledged: int) -> None:
    rows = db_rows(node, "select count(*) from instance")[0][0]
    assert len(node.spool_files()) == rows == acknowledged


def _start_marked(node: NodeProcess, marker: str) -> NodeProcess:
    """NodeProcess.start with a marker in the environment, to find every process it leaves."""
    os.environ["MIGRAINE_TEST_MARK"] = marker
    try:
        return node.start()
    finally:
        del os.environ["MIGRAINE_TEST_MARK"]


# ---- 1. workers end with serve; serve restarts dead workers ---------------------
def test_sigkill_of_serve_ends_its_worker(node_factory, tiny_checkpoint, small_series):
    marker = f"supervision-{uuid.uuid4()}"
    node = _start_marked(node_factory(workers=1, checkpoint=tiny_checkpoint, idle_seconds=1, runtime="torch"), marker)
    serve = node.proc.pid
    worker = wait_until(lambda: worker_children(serve), timeout=30, what="the worker process")[0]
    folder, series = small_series
    sent = storescu(folder, node.port)
    assert sent.returncode == 0, sent.stderr
    acknowledged = len(list(folder.glob("*.dcm")))
    # The worker is up, has its model and polls for the next job: it would poll forever.
    wait_until(lambda: db_rows(node, "select state from series where series_instance_uid = "
                                     f"'{series.series_instance_uid}'") == [("skipped",)],  # 48 slices: too few
               timeout=60, what="the series to be judged")
    wait_until(lambda: " loaded on cpu" in node.log_text(), timeout=120, what="the worker to load its model")
    assert alive(worker) and worker_children(serve) == [worker]

    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    node.proc = None
    wait_until(lambda: not alive(worker), timeout=20, what="the orphaned worker to exit")
    wait_until(lambda: not processes_marked(marker), timeout=20, what="every process of serve to end")
    assert_no_instance_lost(node, acknowledged)


def test_a_stop_while_the_worker_starts_ends_serve_at_once(node_factory):
    """SIGTERM while the worker builds the demo model (about a minute; serve waits WORKER_STOP_SECONDS for
    a worker, then kills it): the worker holds no job yet, so it ends at once, and so does serve. The
    half-built model is never taken for one."""
    marker = f"supervision-{uuid.uuid4()}"
    node = _start_marked(node_factory(workers=1), marker)  # no checkpoint: the demo model is built first
    wait_until(lambda: "using the synthetic demo model, built once" in node.log_text(), timeout=60,
               what="the worker to start building the demo model")
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(WORKER_STOP_SECONDS - 10)  # killed after WORKER_STOP_SECONDS without the fix
    node.proc = None
    log = node.log_text()
    assert code == 0, log[-2000:]
    assert "stopped during start-up" in log and "did not stop" not in log and "worker ready" not in log
    wait_until(lambda: not processes_marked(marker), timeout=20, what="every process of serve to end")
    assert not (node.data_dir / "models" / "demo").exists(), "an interrupted build left where a model is looked for"


def test_dead_worker_is_restarted_and_its_job_counts_an_attempt(node_factory, tiny_checkpoint, t1_series):
    marker = f"supervision-{uuid.uuid4()}"
    node = node_factory(workers=1, checkpoint=tiny_checkpoint, idle_seconds=1, runtime="torch")
    node.config.write_text(node.config.read_text().replace("[worker]\n", "[worker]\nmax_attempts = 2\n"))
    _start_marked(node, marker)
    serve = node.proc.pid
    first = wait_until(lambda: worker_children(serve), timeout=30, what="the worker process")[0]
    folder, series = t1_series
    sent = storescu(folder, node.port)
    assert sent.returncode == 0, sent.stderr
    acknowledged = len(list(folder.glob("*.dcm")))
    uid = series.series_instance_uid

    killed: list[int] = []
    worker = first
    for attempt in (1, 2):
        # The job records which worker holds it; kill that worker while it classifies.
        held = f"classifying in worker process {worker} on {socket.gethostname()}"
        wait_until(lambda: db_rows(node, f"select 1 from job where state = 'classifying' and reason = '{held}'"),
                   timeout=60, interval=0.01, what=f"worker {worker} to classify (attempt {attempt})")
        os.kill(worker, signal.SIGKILL)
        killed.append(worker)
        expected = "queued" if attempt == 1 else "failed"
        state, attempts, reason = wait_until(
            lambda: next(iter(db_rows(node, f"select state, attempts, reason from job where series_instance_uid = "
                                            f"'{uid}' and state = '{expected}'")), None),
            timeout=20, what=f"the job to be {expected} after attempt {attempt}")
        assert attempts == attempt
        assert f"worker process {worker} died (killed by SIGKILL)" in reason
        worker = wait_until(lambda: [p for p in worker_children(serve) if p not in killed], timeout=30,
                            what="serve to start a new worker")[0]
    assert reason.startswith("failed after 2 attempt(s)")
    assert db_rows(node, f"select state from series where series_instance_uid = '{uid}'") == [("failed",)]
    assert node.proc.poll() is None, "serve must survive its workers"
    assert alive(worker) and worker not in killed
    assert_no_instance_lost(node, acknowledged)

    assert node.stop() == 0
    wait_until(lambda: not processes_marked(marker), timeout=20, what="every process of serve to end")
    assert "Traceback" not in node.log_text()


# ---- 2./3. start-up failures: one line, non-zero, nothing left -------------------
def _serve(config: Path, marker: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRAINE_NODE_")}
    env["MIGRAINE_TEST_MARK"] = marker
    return subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def _assert_refused(result: subprocess.CompletedProcess, code: int, needle: str, config: Path, marker: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("migraine-node: ") and needle in last, result.stderr
    assert "Traceback" not in output
    assert not processes_marked(marker)
    assert not processes_marked(str(config))


def _broken_checkpoint(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "corrupted":
        with open(dst / "weights.pt", "r+b") as fh:
            fh.seek(100)
            fh.write(b"\xff" * 16)
    elif how == "no sidecar":
        (dst / "model.json").unlink()
    elif how == "bad sidecar":
        (dst / "model.json").write_text("{not json")
    return dst


def test_port_in_use_is_one_line(tmp_path, tiny_checkpoint):
    marker = f"startup-{uuid.uuid4()}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        node = NodeProcess.write_config(tmp_path, port=port, workers=1, checkpoint=tiny_checkpoint)
        result = _serve(node.config, marker)
    _assert_refused(result, 1, f"cannot listen on 127.0.0.1:{port}", node.config, marker)


@pytest.mark.parametrize("how", ["corrupted", "no sidecar", "bad sidecar", "missing"])
def test_unreadable_checkpoint_is_refused_before_workers_start(tmp_path, tiny_checkpoint, how):
    marker = f"startup-{uuid.uuid4()}"
    if how == "missing":
        checkpoint = tmp_path / "no-such-checkpoint"
    else:
        checkpoint = _broken_checkpoint(tiny_checkpoint, tmp_path / "ckpt", how)
    node = NodeProcess.write_config(tmp_path, port=free_port(), workers=1, checkpoint=checkpoint)
    result = _serve(node.config, marker)
    _assert_refused(result, 2, "[model] checkpoint", node.config, marker)


@pytest.mark.parametrize("content,needle", [
    ('[node]\nport = "eleven"\n', "invalid configuration: [node] port"),
    ('[node]\nport = 0\n[storage]\nmin_free_disk_mb = -1\n', "[storage] min_free_disk_mb"),
    ("[nod]\nport = 1\n", "unknown section"),
    ("[node\n", "not valid TOML"),
])
def test_bad_config_is_one_line(tmp_path, content, needle):
    marker = f"startup-{uuid.uuid4()}"
    config = tmp_path / "bad.toml"
    config.write_text(content)
    _assert_refused(_serve(config, marker), 2, needle, config, marker)


def test_synthetic_model_refused_with_destinations(tmp_path):
    marker = f"startup-{uuid.uuid4()}"
    node = NodeProcess.write_config(tmp_path, port=free_port(), workers=1,
                                    destinations=[{"name": "pacs", "ae_title": "PACS", "port": free_port()}])
    result = _serve(node.config, marker)
    _assert_refused(result, 2, "allow_synthetic_demo_model = true", node.config, marker)
    assert not (node.data_dir / "models").exists()


def test_synthetic_model_needs_explicit_permission_only_with_destinations(tiny_checkpoint):
    pacs = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]
    with pytest.raises(ConfigError, match="allow_synthetic_demo_model"):
        check_model(load_settings(overrides={"destinations": pacs}))
    check_model(load_settings(overrides={"destinations": pacs, "model": {"allow_synthetic_demo_model": True}}))
    check_model(load_settings())  # results go to the outbox only
    check_model(load_settings(overrides={"destinations": pacs, "model": {"checkpoint": str(tiny_checkpoint)}}))


def test_shipped_configs_say_whether_the_demo_model_may_be_sent():
    assert load_settings(ROOT / "deploy" / "config.demo.toml").model.allow_synthetic_demo_model is True
    assert load_settings(ROOT / "deploy" / "config.example.toml").model.allow_synthetic_demo_model is False


# ---- 4. systemd gives a stopping worker its time ---------------------------------
def test_systemd_stop_timeout_exceeds_worker_stop_time():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "migraine-node.service")
    timeout = unit["Service"]["TimeoutStopSec"]
    assert timeout.isdigit(), f"TimeoutStopSec={timeout}: expected plain seconds"
    # serve stops the SCP and scheduler, then waits up to WORKER_STOP_SECONDS per worker job; keep a margin.
    assert int(timeout) >= WORKER_STOP_SECONDS + 15, (timeout, WORKER_STOP_SECONDS)
