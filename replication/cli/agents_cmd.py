"""``replication master-target|process-server|source-agent``: the three daemons.

Every option may also come from ``--config FILE`` (TOML, same names); a flag given
on the command line wins over the file, the file over the built-in default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..blocks import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    _master_target(sub)
    _process_server(sub)
    _source_agent(sub)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with the same keys as the flags")
    p.add_argument(
        "--tls-dir", type=Path, help="from `replication certs init` (default /etc/replication/tls)"
    )
    p.add_argument("--host", help="host name of this agent's certificate (default localhost)")
    p.add_argument("--metrics-listen", help="HOST:PORT for Prometheus metrics (default off)")


def _master_target(sub) -> None:
    p = sub.add_parser("master-target", help="run a master target (owns the target volumes)")
    _common(p)
    p.add_argument("--listen", help="data and control address (default 0.0.0.0:9444)")
    p.add_argument(
        "--data-dir", type=Path, help="apply state (default /var/lib/replication/master-target)"
    )
    p.add_argument("--datastore", type=Path, help="where CreateVolume makes new VMDKs")
    p.add_argument(
        "--volume",
        action="append",
        metavar="NAME=PATH",
        help="register a volume (repeatable); PATH may be a page blob "
        "(pageblob+https://ACCOUNT.blob.core.windows.net/C/B or pageblob:C/B, docs/pageblob.md)",
    )
    p.add_argument("--passphrase-file", type=Path, help="frame key (default TLS_DIR/passphrase)")
    p.add_argument("--retention", help="how far back recovery points reach (default 24h)")
    p.add_argument(
        "--retention-bytes", type=parse_size, help="journal size bound per volume (default 64G)"
    )
    p.add_argument(
        "--crash-interval", help="time between crash-consistent points (default 5m; e.g. 10s)"
    )
    p.set_defaults(func=_run_master_target)


def _process_server(sub) -> None:
    p = sub.add_parser("process-server", help="run a process server (relay, port 9443)")
    _common(p)
    p.add_argument("--listen", help="address (default 0.0.0.0:9443)")
    p.add_argument("--master-target", help="HOST:PORT of the master target")
    p.add_argument("--master-target-host", help="certificate host name of the master target")
    p.add_argument("--spool-dir", type=Path, help="spool directory")
    p.add_argument("--spool-limit", type=parse_size, help="spool size limit (default 8G)")
    p.set_defaults(func=_run_process_server)


def _source_agent(sub) -> None:
    p = sub.add_parser("source-agent", help="replicate local disks to master-target volumes")
    _common(p)
    p.add_argument("--process-server", help="HOST:PORT of the process server")
    p.add_argument("--process-server-host", help="certificate host name of the process server")
    p.add_argument(
        "--disk",
        action="append",
        metavar="VOLUME=PATH",
        help="a disk to protect and the volume it goes to (repeatable)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        default=None,
        help="resync once, exit 0 when everything is PERSISTED",
    )
    p.add_argument(
        "--idle",
        action="store_true",
        default=None,
        help="start no pair until an orchestrator calls StartPair",
    )
    p.add_argument(
        "--rescan-interval",
        type=float,
        help="seconds between hash-compare resyncs in daemon mode (default 300)",
    )
    p.add_argument(
        "--bandwidth-limit",
        metavar="RATE",
        help="cap the frames sent, e.g. 20M or 20MB/s (bytes per second; default none)",
    )
    p.add_argument(
        "--control-listen", help="HOST:PORT of the control service (port 443 role; default off)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="track every disk's writes here (crash-safe dirty bitmaps); pairs ship epochs",
    )
    p.add_argument(
        "--nbd-listen",
        help="HOST:PORT of an NBD front end serving each disk by name (needs --state-dir)",
    )
    p.add_argument(
        "--pre-hook", help="command run before an app-consistent tag (e.g. 'fsfreeze -f /data')"
    )
    p.add_argument("--post-hook", help="command run after an app-consistent tag's cut")
    p.add_argument(
        "--app-interval",
        help="app-consistent tags of every tracked disk this often, with the hooks (default 1h;"
        " only when --pre-hook is set)",
    )
    p.add_argument("--block-size", type=parse_size, help="default 64K")
    p.add_argument("--deadline", type=float, help="give up after this many seconds")
    p.add_argument("--passphrase-file", type=Path, help="frame key (default TLS_DIR/passphrase)")
    p.set_defaults(func=_run_source_agent)


def _settings(args: argparse.Namespace, defaults: dict) -> dict:
    from ..config import load_config, merge

    config = load_config(args.config) if args.config else {}
    cli = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in defaults})
    return merge(config, cli, defaults, source=str(args.config or "config"))


def _run_master_target(args: argparse.Namespace) -> int:
    from agents.master_target import main

    return main.run(_settings(args, main.DEFAULTS))


def _run_process_server(args: argparse.Namespace) -> int:
    from agents.process_server import main

    return main.run(_settings(args, main.DEFAULTS))


def _run_source_agent(args: argparse.Namespace) -> int:
    from agents.source_agent import main

    return main.run(_settings(args, main.DEFAULTS))
