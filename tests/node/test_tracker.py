from __future__ import annotations

import pytest

from node.tracker import completion_reason
from storage.store import SeriesSnapshot


def snap(instances: int, expected: int | None, first: float = 0.0, last: float = 0.0) -> SeriesSnapshot:
    return SeriesSnapshot("1.2.3", instances, expected, first, last)


@pytest.mark.parametrize(
    ("series", "now", "sender_active", "expected"),
    [
        (snap(170, 170, last=5), 6, False, "expected instance count reached (170/170) and sender released"),
        (snap(170, 170, last=5), 6, True, None),  # sender still connected: wait
        (snap(169, 170, last=5), 6, False, None),  # one slice short: wait for idle
        (snap(169, 170, last=5), 15, False, "idle for 10 s"),
        (snap(1, 1, last=5), 5, False, "expected instance count reached (1/1) and sender released"),
        (snap(3, None, first=0, last=99), 100, True, "max wait of 100 s reached"),
        (snap(3, None, first=0, last=99), 99.5, True, None),
    ],
)
def test_completion_rules(series, now, sender_active, expected):
    assert completion_reason(series, now, idle_seconds=10, max_wait_seconds=100, sender_active=sender_active) == expected
