"""The ``replication`` command line.

Each sub-command lives in its own module (``cli/<name>_cmd.py``) exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a function
``run(args) -> int``. :func:`main` turns every :class:`ReplicationError` into a
one-line message on stderr (or a JSON record with ``--json``) and a non-zero exit:
no traceback ever reaches the user for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import ReplicationError

__all__ = ["build_parser", "main"]

_COMMAND_MODULES = (
    "disk_cmd",
    "sync_cmd",
    "frame_cmd",
    "demo_cmd",
    "certs_cmd",
    "agents_cmd",
    "control_cmd",
    "bench_cmd",
    "orchestrate_cmd",
    "verify_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="replication",
        description="Block-level delta replication for VMware/Azure failback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue  # a command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ReplicationError as err:
        _report(err, as_json=getattr(args, "json", False))
        return err.exit_status
    except KeyboardInterrupt:
        print("replication: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


def _report(err: ReplicationError, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": err.to_dict()}), file=sys.stdout)
    print(f"replication: error [{err.code}]: {err}", file=sys.stderr)
