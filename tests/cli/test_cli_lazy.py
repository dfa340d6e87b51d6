"""The CLI builds only the parser it needs: start-up pays for one sub-command's imports."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from replication import cli


def test_the_command_table_names_every_command_of_every_module():
    registered = {}
    for name in cli._COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"replication.cli.{name}").register(sub)
        registered.update({command: name for command in sub.choices})
    assert registered == cli._COMMANDS


def test_the_help_table_holds_each_commands_own_help_line_in_order():
    helps = {}
    for name in cli._COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"replication.cli.{name}").register(sub)
        helps.update({a.dest: a.help for a in sub._choices_actions})
    assert helps == cli._HELP
    assert list(helps) == list(cli._HELP)


def test_the_top_level_help_imports_no_command_module():
    code = (
        "import sys\n"
        "from replication.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('replication.cli.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "    bench          benchmark scan, delta sync, replication and failback" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys\n"
        "from replication.cli import main\n"
        "try:\n"
        "    main(['sync', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('replication.cli.')))\n"
        "print('replication.orchestrator' in sys.modules, 'cryptography.x509' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "['replication.cli.sync_cmd']"
    assert lines[-1] == "False False"


def test_help_still_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "replication", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command, text in cli._HELP.items():
        assert f"    {command}" in proc.stdout
        assert " ".join(text.split()[:3]) in " ".join(proc.stdout.split())


def test_an_unknown_command_is_refused_naming_every_choice():
    proc = subprocess.run(
        [sys.executable, "-m", "replication", "warp"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid choice: 'warp'" in proc.stderr and "'source-agent'" in proc.stderr


def test_openblas_gets_one_thread_before_numpy_loads_unless_the_user_chose():
    code = (
        "import os, sys\n"
        "import replication.cli\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), 'numpy' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, expected in ((None, "1 False"), ("4", "4 False")):
        run_env = env if given is None else {**env, "OPENBLAS_NUM_THREADS": given}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=run_env
        )
        assert proc.stdout.strip() == expected, proc.stderr
