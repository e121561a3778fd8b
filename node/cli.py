"""`migraine-node` command line. `main(argv)` is callable from tests.

Exit codes: 0 ok, 1 operation failed (peer down, series unknown),
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from node import __version__
from node.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    Settings,
    describe_config_source,
    load_settings,
    resolve_config_path,
)
from node.errors import ConfigError, NodeError
from node.logs import setup_logging
from storage.models import SeriesState
from storage.schema import SchemaError

log = logging.getLogger("node.cli")


def _settings(args: argparse.Namespace, overrides: dict | None = None) -> Settings:
    """Settings from --config, else $MIGRAINE_NODE_CONFIG, else /etc/migraine-node/config.toml, else defaults.

    Says which on stderr (stdout stays clean for --json), and records the file in
    `args.config` so worker processes and the demo load the same one.
    """
    path, why = resolve_config_path(args.config)
    print(describe_config_source(path, why), file=sys.stderr)
    args.config = None if path is None else str(path)
    return load_settings(path, overrides)


def _store(settings: Settings, read_only: bool = False):  # noqa: ANN202
    """The node's JobStore. `read_only` (jobs, show, status) never creates a database:
    a missing SQLite file is an error (NodeError: exit 1), not an empty node."""
    from storage.db import make_engine
    from storage.store import JobStore

    url = settings.storage.resolved_database_url
    if read_only:
        from pathlib import Path

        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = parsed.database or ""
            if path in ("", ":memory:") or not Path(path).is_file():
                raise NodeError(f"no database at {path or url}: the node has not run with this configuration "
                                "(check --config)")
    return JobStore(make_engine(url))


def _select_series(datasets):  # noqa: ANN001, ANN202
    """The node's selection rules for `predict` (model/ imports nothing from node/, so they are passed in)."""
    from node.selection import header_from_datasets, select_series

    return select_series(header_from_datasets(datasets))


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.port is not None:
        overrides.setdefault("node", {})["port"] = args.port
    if args.host is not None:
        overrides.setdefault("node", {})["host"] = args.host
    settings = _settings(args, overrides)
    setup_logging(settings.node.log_level)
    from node.service import NodeService
    from node.signals import stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop, [signal.SIGTERM, signal.SIGINT])
    try:
        service = NodeService(settings, args.config, overrides, role=args.role)
    except OSError as exc:  # data_dir or database not usable
        raise NodeError(f"cannot start: {exc}") from None
    # Start-up errors (model, port) stop whatever had started and surface as NodeError/ConfigError.
    service.serve_forever(stop)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """`db upgrade` migrates the job database to this release's schema; `db status` shows both."""
    settings = _settings(args)
    from storage.db import make_engine
    from storage.schema import schema_state, upgrade

    url = settings.storage.resolved_database_url
    if url.startswith("sqlite:"):
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(url, check_schema=False)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if args.db_command == "status":
            state = schema_state(engine)
            current = "empty" if state.empty else state.current + ("" if state.versioned else " (release 0.1.0)")
            print(json.dumps({"database": shown, "current": state.current, "head": state.head,
                              "up_to_date": state.current == state.head}) if args.json
                  else f"database {shown}: schema {current}; this release runs on {state.head}"
                  + ("" if state.current == state.head else " (run `migraine-node db upgrade`)"))
            return 0
        before, after = upgrade(engine, shown)
    finally:
        engine.dispose()
    if before == after:
        print(f"database {shown}: already at schema revision {after}")
    else:
        print(f"database {shown}: upgraded from {before or 'empty'} to schema revision {after}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Retention now, or with --dry-run what it would remove."""
    settings = _settings(args)
    setup_logging("WARNING")
    from storage.retention import purge, purge_audit, result_folders
    from storage.spool import Spool
    from storage.store import iso

    store = _store(settings, read_only=True)
    storage = settings.storage
    try:
        report = purge(store.engine, Spool(storage.spool_dir), storage.retention_days,
                       storage.skipped_retention_days, dry_run=args.dry_run, limit=None,
                       result_roots=result_folders(storage.data_dir))
        audit_events = purge_audit(store.engine, storage.audit_retention_days, dry_run=args.dry_run)
        if not report.dry_run:
            from storage.audit import record_purge

            record_purge(store.engine, report)
    finally:
        store.engine.dispose()
    if args.json:
        print(json.dumps({
            "dry_run": report.dry_run, "purged": report.purged, "files_removed": report.files_removed,
            "bytes_removed": report.bytes_removed, "audit_events_removed": audit_events,
            "series": [{"series_instance_uid": c.series_instance_uid, "study_instance_uid": c.study_instance_uid,
                        "state": c.state, "done_at": iso(c.done_at), "files": c.files, "size_bytes": c.size_bytes}
                       for c in report.candidates]}, indent=2))
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for c in report.candidates:
        print(f"{verb} {c.files} file(s), {c.size_bytes / 1e6:.1f} MB: series {c.series_instance_uid} "
              f"({c.state} {iso(c.done_at)})")
    total_files = sum(c.files for c in report.candidates) if report.dry_run else report.files_removed
    total_bytes = sum(c.size_bytes for c in report.candidates) if report.dry_run else report.bytes_removed
    print(f"{len(report.candidates) if report.dry_run else report.purged} series, {total_files} file(s), "
          f"{total_bytes / 1e6:.1f} MB {'would be removed' if report.dry_run else 'removed'} (retention_days={storage.retention_days:g}, "
          f"skipped_retention_days={storage.skipped_retention_days:g}; 0 = keep)")
    if storage.audit_retention_days > 0:
        print(f"{audit_events} audit event(s) older than {storage.audit_retention_days:g} days "
              f"{'would be removed' if report.dry_run else 'removed'} (audit_retention_days)")
    return 0


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("no series")
        return
    header = ("STATE", "INST", "RESULT", "UPDATED", "SERIES INSTANCE UID", "DESCRIPTION", "REASON")
    lines = [
        (
            r["state"],
            str(r["instances"]),
            "" if r["probability"] is None else f"{r['label']} {r['probability']:.2f}",
            r["updated_at"],
            r["series_instance_uid"],
            r["series_description"] or "",
            r["reason"] or "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
    for line in (header, *lines):
        print("  ".join(col.ljust(w) for col, w in zip(line[:-1], widths)) + "  " + line[-1])


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging("WARNING")
    from node.demo import run_demo
    from storage.db import make_engine
    from storage.schema import upgrade

    # The demo's own database, left by an earlier release, follows the release it runs: no separate
    # `db upgrade` step. A new one is made by the node as usual (and nothing before the demo's checks).
    from sqlalchemy.engine import make_url

    url = settings.storage.resolved_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and Path(parsed.database).is_file():
        engine = make_engine(url, check_schema=False)
        try:
            upgrade(engine, url)
        finally:
            engine.dispose()
    try:
        return run_demo(settings, args.config, viewer=args.viewer)
    except KeyboardInterrupt:  # everything it started is shut down on the way out
        print("\nmigraine-node: demo interrupted", file=sys.stderr)
        return 130


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _store(_settings(args), read_only=True)
    rows = [v.to_json() for v in store.list_series(args.state)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(_settings(args), read_only=True)
    view = store.get_series(args.series_instance_uid)
    if view is None:
        print(f"no series with Series Instance UID {args.series_instance_uid}", file=sys.stderr)
        return 1
    data = view.to_json(detail=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key not in ("jobs", "deliveries", "timings", "sent_objects"):
            print(f"{key:22} {'' if value is None else value}")
    print("jobs:")
    for job in data["jobs"]:
        print(f"  v{job['version']} job {job['job_id']}: {job['state']} ({job['instances']} instances) {job['reason'] or ''}")
        if job["probability"] is not None:
            print(f"      {job['label']} p={job['probability']:.3f} model {job['model_id']} SR {job['sr_sop_instance_uid']}")
            print(f"      timings ms: {job['timings']}")
        for obj in job["objects"]:
            replaces = f" (replaces {obj['predecessor_sop_instance_uid']})" if obj["predecessor_sop_instance_uid"] else ""
            print(f"      {obj['kind']:5} {obj['sop_instance_uid']}{replaces}")
        for d in job["deliveries"]:
            print(f"      delivery to {d['destination']}: {d['state']} after {d['attempts']} attempt(s) {d['last_error'] or ''}")
    print("objects sent:" if data["sent_objects"] else "objects sent: none")
    for t in data["sent_objects"]:
        print(f"  {t['sent_at']}  v{t['version']} {t['kind']:5} {t['sop_instance_uid']} -> {t['destination']} "
              f"(status 0x{t['status']:04X})")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from storage.jobs import JobQueue, JobStoreError

    settings = _settings(args)
    store = _store(settings)
    queue = JobQueue(store.engine)
    if args.from_pacs:
        from node.retrieve import retrieve_study
        from node.scp import Ingest
        from storage.spool import Spool

        peer = next((d for d in settings.destinations if d.name == args.from_pacs), None)
        if peer is None:
            names = ", ".join(d.name for d in settings.destinations) or "none configured"
            print(f"no [[destinations]] named {args.from_pacs!r} (known: {names})", file=sys.stderr)
            return 1
        ingest = Ingest(Spool(settings.storage.spool_dir), store, settings.storage.min_free_disk_mb)
        count = retrieve_study(peer, args.uid, ingest, settings.node.ae_title, settings=settings)
        print(f"retrieved {count} instance(s) of study {args.uid} from {peer.name}")
    try:
        series = queue.replay(args.uid)
    except JobStoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    for uid in series:
        print(f"replay queued: series {uid} (new job version; history kept)")
    from storage.audit import record_replay

    record_replay(store.engine, args.uid, series, args.from_pacs)
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from storage.jobs import JobQueue, JobStoreError

    settings = _settings(args)
    queue = JobQueue(_store(settings).engine)
    try:
        count = queue.resend(args.series_instance_uid, [d.name for d in settings.destinations])
    except JobStoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"SR of series {args.series_instance_uid} queued for delivery to {count} destination(s)")
    from storage.audit import record_resend

    record_resend(queue.engine, args.series_instance_uid, [d.name for d in settings.destinations])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from storage.jobs import JobQueue

    from storage.store import iso

    settings = _settings(args)
    summary = JobQueue(_store(settings, read_only=True).engine).status()
    data = {
        "series": summary["series"],
        "queue_depth": sum(summary["series"].get(s, 0) for s in ("complete", "queued", "classifying")),
        "failed": summary["series"].get("failed", 0),
        "deliveries": summary["deliveries"],
        "last_failure": None if summary["last_failure"] is None else {
            "series_instance_uid": summary["last_failure"][0], "reason": summary["last_failure"][1],
            "at": iso(summary["last_failure"][2])},
        "last_delivery_error": None if summary["last_delivery_error"] is None else {
            "destination": summary["last_delivery_error"][0], "error": summary["last_delivery_error"][1],
            "at": iso(summary["last_delivery_error"][2])},
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"queue depth {data['queue_depth']}, failed {data['failed']}")
    print("series: " + (", ".join(f"{k} {v}" for k, v in sorted(data["series"].items())) or "none"))
    print("deliveries: " + (", ".join(f"{k} {v}" for k, v in sorted(data["deliveries"].items())) or "none"))
    if data["last_failure"]:
        f = data["last_failure"]
        print(f"last failure: {f['at']} series {f['series_instance_uid']}: {f['reason']}")
    if data["last_delivery_error"]:
        e = data["last_delivery_error"]
        print(f"last delivery error: {e['at']} {e['destination']}: {e['error']}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail (storage/audit.py), oldest first."""
    from storage.audit import events, format_event, parse_since

    try:
        since = None if args.since is None else parse_since(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit: give the number of newest events to show, 1 or more")
    store = _store(_settings(args), read_only=True)
    try:
        rows = events(store.engine, since=since, kinds=args.kind or (), limit=args.limit)
    finally:
        store.engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(format_event(row))
        if not rows:
            print("no audit events" + (f" since {args.since}" if args.since else ""))
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.echo import echo

    settings = _settings(args)
    result = echo(args.peer, settings.destinations, settings.node.ae_title, timeout=args.timeout)
    calling = f" (calling AE {settings.node.ae_title})" if result.dimse else ""
    print(f"{result.what}: success in {result.ms:.1f} ms{calling}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(f"{args.file}: OK")
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} when it exists, "
        "else built-in defaults)",
    )
    parser = argparse.ArgumentParser(
        prog="migraine-node",
        description="DICOM node predicting NSAID response in migraine from 3D T1 MRI. Research use only.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the node (C-STORE SCP, tracker, worker)")
    p.add_argument("--port", type=int, help="override [node] port")
    p.add_argument("--host", help="override [node] host")
    p.add_argument("--role", choices=["all", "ingest", "worker", "export"], default="all",
                   help="which part of the node runs in this process: ingest (C-STORE SCP, series completion, "
                   "selection), worker (classification), export (results to PACS), or all (default); several "
                   "processes share one PostgreSQL database and spool (docs/operations.md)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common], help="end-to-end demo on loopback with a stand-in PACS")
    p.add_argument("--viewer", action="store_true",
                   help="afterwards keep Orthanc and the OHIF viewer running on loopback and print the study's "
                   "viewer URL, until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("jobs", parents=[common], help="list series and their state")
    p.add_argument("--state", choices=[s.value for s in SeriesState], help="only series in this state")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("show", parents=[common], help="one series in detail, with its job history")
    p.add_argument("series_instance_uid", metavar="SERIES_UID")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("replay", parents=[common], help="classify a series or study again (new job version)")
    p.add_argument("uid", metavar="STUDY_UID|SERIES_UID")
    p.add_argument("--from-pacs", metavar="NAME",
                   help='first retrieve the study from this destination (C-GET, or C-MOVE to our AE title with '
                   'retrieve = "move")')
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("resend", parents=[common], help="send the existing SR of a series again")
    p.add_argument("series_instance_uid", metavar="SERIES_UID")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("purge", parents=[common], help="remove spool files past [storage] retention_days now")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("db", help="the job database's schema (Alembic migrations)")
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    d = db_sub.add_parser("upgrade", parents=[common], help="migrate the database to this release's schema "
                          "(back it up first)")
    d.set_defaults(func=cmd_db)
    d = db_sub.add_parser("status", parents=[common], help="the database's schema revision and this release's")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_db)

    p = sub.add_parser("status", parents=[common], help="queue depth, failures, last error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    from storage.audit import KINDS as AUDIT_KINDS

    p = sub.add_parser("audit", parents=[common], help="the audit trail: associations, studies received, objects "
                       "sent, replays, resends, purges (identifiers only)")
    p.add_argument("--since", metavar="WHEN", help="only events since a duration ago (90s, 15m, 24h, 7d, 2w) or "
                   "an ISO 8601 date or time (UTC unless it has an offset)")
    p.add_argument("--kind", action="append", choices=AUDIT_KINDS, help="only events of this kind (repeatable)")
    p.add_argument("--limit", type=int, metavar="N", help="only the newest N events")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("echo", parents=[common], help="check a peer: C-ECHO AE@HOST:PORT, or a [[destinations]] "
                       "name (C-ECHO, or QIDO-RS for a DICOMweb url)")
    p.add_argument("peer", metavar="AE@HOST:PORT|DESTINATION")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=cmd_echo)

    from model.cli import register as register_model_commands

    register_model_commands(sub, common, select_series=_select_series)

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    c = config_sub.add_parser("check", help="validate a configuration file (and MIGRAINE_NODE_* variables)")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"migraine-node: {_one_line(exc)}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"migraine-node: {_one_line(exc)}", file=sys.stderr)
        return 1
    except SchemaError as exc:
        print(f"migraine-node: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: Exception) -> str:
    """Errors end the output as one line (`invalid configuration: a; b`), easy to grep in a journal."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} {'; '.join(lines[1:])}"


if __name__ == "__main__":
    sys.exit(main())
