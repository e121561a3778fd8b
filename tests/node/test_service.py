"""node/service.py's pipeline stages: a tick, and a wake-up that runs the stage at once."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from node.service import Stage
from tests.peers import wait_until

HOUR = 3600.0  # a tick that never comes during a test: only a wake-up makes a stage run again


def _stopped(stage: Stage) -> None:
    stopper = threading.Thread(target=stage.stop)
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() must wake the stage from its wait"


@pytest.mark.parametrize("kind", ["threading", "multiprocessing"])
def test_a_woken_stage_runs_at_once_and_wake_ups_during_a_run_bring_one_more_run(kind):
    signal = threading.Semaphore(0) if kind == "threading" else multiprocessing.get_context("spawn").Semaphore(0)
    runs, running, proceed = [], threading.Event(), threading.Event()

    def step() -> None:
        runs.append(len(runs))
        if len(runs) == 2:
            running.set()
            proceed.wait(10)

    stage = Stage("test", step, HOUR, signal)
    stage.start()
    try:
        wait_until(lambda: len(runs) == 1, timeout=10, what="the first run at start")
        stage.wake()
        wait_until(running.is_set, timeout=10, what="a run on wake-up")
        for _ in range(3):  # three wake-ups while it runs
            stage.wake()
        proceed.set()
        wait_until(lambda: len(runs) == 3, timeout=10, what="one more run after the wake-ups")
    finally:
        _stopped(stage)
    assert len(runs) == 3  # the three wake-ups were served by one run


def test_a_failing_stage_keeps_running(caplog):
    calls = []

    def step() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    stage = Stage("flaky", step, HOUR)
    stage.start()
    try:
        wait_until(lambda: calls, timeout=10)
        stage.wake()
        wait_until(lambda: len(calls) == 2, timeout=10, what="the run after a failed one")
    finally:
        _stopped(stage)
    assert "flaky step failed" in caplog.text and "database is locked" in caplog.text
