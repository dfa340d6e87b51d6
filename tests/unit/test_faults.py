"""Named crash points: the registry, its documentation, and the environment switch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from replication.faults import POINTS

DOC = Path(__file__).resolve().parents[2] / "docs" / "proving-ground.md"


def test_the_documented_table_lists_exactly_the_registered_points():
    section = DOC.read_text().split("## Named crash points", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z]+\.[a-z_]+)` \|", section, re.M))
    assert documented == set(POINTS)


def test_a_process_dies_by_sigkill_at_the_nth_pass_of_its_point():
    code = (
        "from replication.faults import crash_point\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    crash_point('spool.synced')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"REPLICATION_CRASH_AT": "spool.synced@3", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == -9
    assert done.stdout.split() == ["0", "1", "2"]
    assert "crash point spool.synced reached" in done.stderr
