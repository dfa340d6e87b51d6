"""The ``replication`` command line.

Each sub-command lives in its own module (``cli/<name>_cmd.py``) exposing
``register(subparsers)``, which adds its parser and sets ``func`` to a function
``run(args) -> int``. :func:`main` turns every :class:`ReplicationError` into a
one-line message on stderr (or a JSON record with ``--json``) and a non-zero exit:
no traceback ever reaches the user for an expected failure.

The parser is built lazily: ``replication sync ...`` imports only the module that
registers ``sync`` (``_COMMANDS``), not the other commands' dependencies (the
orchestrator, cryptography's x509, gRPC), which cost about 0.4 s of start-up. The
top-level help (``replication``, ``replication --help``) imports no command module:
it lists the commands with their one-line help from ``_HELP``. A word that is not
in the table imports every module, so the table only ever saves time, never hides
a command; tests/cli checks both tables against what the modules register.
"""

from __future__ import annotations

import os

# numpy loads OpenBLAS, which starts a thread per core and sets up its buffers at
# import: ~0.1 CPU-s per command on this project's 2-core VMs (docs/benchmarks.md),
# for matrix routines nothing here calls. One thread unless the user asked
# otherwise; set before any command module imports numpy (agents started from here
# inherit it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
from collections.abc import Sequence

from ..errors import ReplicationError
from ..heap import return_large_buffers

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

#: every sub-command and the module that registers it (tests/cli checks the table
#: against the modules); a command not listed still works, more slowly
_COMMANDS = {
    "disk": "disk_cmd",
    "sync": "sync_cmd",
    "frame": "frame_cmd",
    "demo": "demo_cmd",
    "certs": "certs_cmd",
    "master-target": "agents_cmd",
    "process-server": "agents_cmd",
    "source-agent": "agents_cmd",
    "agent": "control_cmd",
    "tag": "control_cmd",
    "recovery-points": "control_cmd",
    "bench": "bench_cmd",
    "orchestrate": "orchestrate_cmd",
    "store": "orchestrate_cmd",
    "verify": "verify_cmd",
}

#: each command's one-line help, as its module registers it, in the order of
#: ``replication --help``
_HELP = {
    "disk": "inspect or create disk images",
    "sync": "delta-sync SOURCE into TARGET",
    "frame": "inspect or make block frames",
    "demo": "run the whole failback journey on generated disks",
    "certs": "make the CA and daemon certificates",
    "master-target": "run a master target (owns the target volumes)",
    "process-server": "run a process server (relay, port 9443)",
    "source-agent": "replicate local disks to master-target volumes",
    "agent": "status and commands of a running agent (control service)",
    "tag": "a tagged cut on a source agent's disks (= agent tag)",
    "recovery-points": "recovery points of a volume (= agent points)",
    "bench": "benchmark scan, delta sync, replication and failback against baselines",
    "orchestrate": "failback journey: register, reprotect, failover",
    "store": "back up or restore the orchestrator's configuration store",
    "verify": "prove two disks, or a disk and a recovery point, equal",
}


def build_parser(command: str | None = None, *, help_only: bool = False) -> argparse.ArgumentParser:
    """Return the top-level parser: every sub-command, or only ``command``'s module.

    With a ``command`` listed in ``_COMMANDS`` only the module that registers it is
    imported; with ``help_only`` (no command named: the top-level help or usage
    error) none is, and each command is a stub carrying its ``_HELP`` line;
    otherwise (an unknown word) every module is.
    """
    import importlib

    parser = argparse.ArgumentParser(
        prog="replication",
        description="Block-level delta replication for VMware/Azure failback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if help_only and command is None:
        for name, text in _HELP.items():
            sub.add_parser(name, help=text)
        return parser
    modules = (_COMMANDS[command],) if command in _COMMANDS else _COMMAND_MODULES
    for name in modules:
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
    argv = sys.argv[1:] if argv is None else list(argv)
    return_large_buffers()  # an agent's memory must follow its configuration
    command = _command_of(argv)
    parser = build_parser(command, help_only=command is None and _asks_help(argv))
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


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names: its first word, unless an option comes first.

    The top-level parser has no option but ``--help``, so anything else before the
    command (or nothing) means: build the whole parser and let argparse answer.
    """
    if argv and not argv[0].startswith("-"):
        return argv[0]
    return None


def _asks_help(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (naming no command) can only end in the top-level help or usage.

    No arguments, or only ``-h``/``--help``: argparse prints the command list and
    exits before any command would run, so the stubs' help lines are enough.
    """
    return all(a in ("-h", "--help") for a in argv)


def _report(err: ReplicationError, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": err.to_dict()}), file=sys.stdout)
    print(f"replication: error [{err.code}]: {err}", file=sys.stderr)
