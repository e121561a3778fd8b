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

from node import __version__
from node.config import CONFIG_ENV, Settings, load_settings
from node.errors import ConfigError, NodeError
from node.logs import setup_logging
from storage.models import SeriesState

log = logging.getLogger("node.cli")


def _settings(args: argparse.Namespace, overrides: dict | None = None) -> Settings:
    return load_settings(args.config, overrides)


def _store(settings: Settings):  # noqa: ANN202
    from storage.db import make_engine
    from storage.store import JobStore

    return JobStore(make_engine(settings.storage.resolved_database_url))


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.port is not None:
        overrides.setdefault("node", {})["port"] = args.port
    if args.host is not None:
        overrides.setdefault("node", {})["host"] = args.host
    settings = _settings(args, overrides)
    setup_logging(settings.node.log_level)
    from node.service import NodeService

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    NodeService(settings).serve_forever(stop)
    return 0


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("no series")
        return
    header = ("STATE", "INST", "UPDATED", "SERIES INSTANCE UID", "DESCRIPTION", "REASON")
    lines = [
        (
            r["state"],
            str(r["instances"]),
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


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    rows = [v.to_json() for v in store.list_series(args.state)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    view = store.get_series(args.series_instance_uid)
    if view is None:
        print(f"no series with Series Instance UID {args.series_instance_uid}", file=sys.stderr)
        return 1
    data = view.to_json(detail=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key != "jobs":
            print(f"{key:20} {'' if value is None else value}")
    print("jobs:")
    for job in data["jobs"]:
        print(f"  v{job['version']} job {job['job_id']}: {job['state']} ({job['instances']} instances) {job['reason'] or ''}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.echo import c_echo, parse_peer

    settings = _settings(args)
    peer = parse_peer(args.peer)
    ms = c_echo(peer, settings.node.ae_title, timeout=args.timeout)
    print(f"C-ECHO {peer}: success in {ms:.1f} ms (calling AE {settings.node.ae_title})")
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
        help=f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)",
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("jobs", parents=[common], help="list series and their state")
    p.add_argument("--state", choices=[s.value for s in SeriesState], help="only series in this state")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("show", parents=[common], help="one series in detail, with its job history")
    p.add_argument("series_instance_uid", metavar="SERIES_UID")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a peer: AE@HOST:PORT")
    p.add_argument("peer", metavar="AE@HOST:PORT")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=cmd_echo)

    from model.cli import register as register_model_commands

    register_model_commands(sub, common)

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
        print(f"migraine-node: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"migraine-node: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
