"""``replication certs``: make the CA and the certificates of the daemons.

* ``replication certs init DIR --host NAME [--host NAME ...] [--days N] [--force]``
  writes a CA, one certificate per role for every host, and the frame-key
  passphrase file; see :mod:`replication.certs` for the layout. It refuses to
  replace an existing CA without ``--force``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..certs import DEFAULT_DAYS, ROLES, init_tls_dir

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``certs`` command and its ``init`` sub-command."""
    parser = subparsers.add_parser("certs", help="make the CA and daemon certificates")
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "init",
        help="create a CA, per-host role certificates and the passphrase file",
        description=f"Create DIR/ca.pem, DIR/ca.key, DIR/passphrase and, for each host, "
        f"DIR/HOST/ROLE.pem and .key for the roles {', '.join(ROLES)}.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="directory to write (created 0700)")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="host name (or IP) the certificates are for; repeat for each host",
    )
    p.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        help=f"validity of every certificate in days (default {DEFAULT_DAYS})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.add_argument("--json", action="store_true", help="print the files written as JSON")
    p.set_defaults(func=run, action=_init)


def run(args: argparse.Namespace) -> int:
    """Run the selected ``certs`` action."""
    return int(args.action(args))


def _init(args: argparse.Namespace) -> int:
    written = init_tls_dir(args.dir, args.host, days=args.days, force=args.force)
    if args.json:
        print(json.dumps({"written": [str(p) for p in written]}))
    else:
        for path in written:
            print(path)
    return 0
