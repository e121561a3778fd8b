from __future__ import annotations

import pytest

from node.tracker import Completion, completion_reason
from storage.models import SeriesState
from storage.store import SeriesSnapshot


def snap(instances: int, expected: int | None, first: float = 0.0, last: float = 0.0) -> SeriesSnapshot:
    return SeriesSnapshot("1.2.3", instances, expected, first, last)


def complete(reason: str) -> Completion:
    return Completion(SeriesState.COMPLETE, reason)


@pytest.mark.parametrize(
    ("series", "now", "sender_active", "expected"),
    [
        (snap(170, 170, last=5), 6, False, complete("expected instance count reached (170/170) and sender released")),
        (snap(170, 170, last=5), 6, True, None),  # sender still connected: wait
        (snap(170, 170, last=5), 15, True,
         complete("expected instance count reached (170/170) and idle for 10 s")),
        (snap(169, 170, last=5), 6, False, None),  # one slice short: wait
        (snap(169, 170, last=5), 15, False, None),  # known count not reached: idle is not the end
        (snap(1, 1, last=5), 5, False, complete("expected instance count reached (1/1) and sender released")),
        (snap(3, None, last=5), 15, False, complete("idle for 10 s")),  # unknown count: the idle rule
        (snap(3, None, first=0, last=99), 100, True, complete("max wait of 100 s reached")),
        (snap(3, None, first=0, last=99), 99.5, True, None),
    ],
)
def test_completion_rules(series, now, sender_active, expected):
    assert completion_reason(series, now, idle_seconds=10, max_wait_seconds=100, sender_active=sender_active) == expected


def test_known_count_never_filled_waits_for_max_wait_then_is_incomplete():
    series = snap(120, 170, first=0, last=60)
    rule = dict(idle_seconds=10, max_wait_seconds=1800, sender_active=False)
    assert completion_reason(series, 1000, **rule) is None  # long idle, still waiting
    verdict = completion_reason(series, 1800, **rule)
    assert verdict == Completion(SeriesState.INCOMPLETE, "120 of 170 expected instances after 1800 s")
    assert not verdict.complete


def test_incomplete_even_while_a_sender_is_connected():
    verdict = completion_reason(snap(5, 170, first=0, last=99), 100, idle_seconds=10, max_wait_seconds=100,
                                sender_active=True)
    assert verdict is not None and verdict.state == SeriesState.INCOMPLETE


def test_over_full_series_is_complete():
    # More instances than Images in Acquisition (a resend with new UIDs): complete, not incomplete.
    verdict = completion_reason(snap(171, 170, last=5), 6, idle_seconds=10, max_wait_seconds=100, sender_active=False)
    assert verdict is not None and verdict.complete
