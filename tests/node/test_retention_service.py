"""Retention runs on the node's scheduler: a skipped series' spool files go after
skipped_retention_days while the node keeps receiving, and the history stays."""

from __future__ import annotations

from tests.peers import storescu, wait_until


def test_the_scheduler_purges_a_skipped_series_and_keeps_its_history(in_process_node, small_series, monkeypatch):
    import node.service

    monkeypatch.setattr(node.service, "RETENTION_SECONDS", 0.5)
    # 48 slices: selection skips it (a 3D T1 has at least 100); kept 0.1 s after that.
    svc = in_process_node(storage={"skipped_retention_days": 0.1 / 86400, "retention_days": 30})
    folder, series = small_series
    sent = storescu(folder, svc.port)
    assert sent.returncode == 0, sent.stderr
    uid = series.series_instance_uid
    wait_until(lambda: svc.store.get_series(uid).state == "skipped", timeout=60, what="the series to be skipped")
    view = wait_until(lambda: (v := svc.store.get_series(uid)).purged_at and v, timeout=30,
                      what="retention to purge the skipped series")
    assert view.state == "skipped" and view.instances == 48 and "only 48 slice(s)" in view.reason
    assert not list(svc.spool.root.glob(f"*/{uid}/*.dcm"))
    assert svc.store.instance_paths() == {}
    # The same series sent again is received from scratch: a new version, counted from zero.
    sent = storescu(folder, svc.port)
    assert sent.returncode == 0, sent.stderr
    view = wait_until(lambda: (v := svc.store.get_series(uid)).version == 2 and v.state == "skipped" and v,
                      timeout=60, what="the resent series to be judged again")
    assert view.instances == 48
