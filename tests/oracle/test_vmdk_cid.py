"""CIDs are hex numbers: a qemu-made child whose parentCID has no leading zeros opens."""

from __future__ import annotations

import re
import subprocess

from replication.disks import create_disk, open_disk
from tests.helpers import require


def test_a_child_whose_parent_cid_lost_its_leading_zeros_opens(tmp_path):
    qemu_img = require("qemu-img")
    base = tmp_path / "base.vmdk"
    with create_disk(str(base), 1 << 20, format="vmdk", subformat="monolithicFlat") as d:
        d.write(0, b"parent data" * 100)
        d.flush()
    text = base.read_text()
    base.write_text(re.sub(r"(?m)^CID=\w+$", "CID=0012abcd", text))
    child = tmp_path / "child.vmdk"
    subprocess.run(
        [qemu_img, "create", "-q", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(child)],
        check=True,
        timeout=30,
    )
    assert re.search(r"(?m)^parentCID=12abcd$", child.read_text(errors="replace"))
    with open_disk(str(child)) as disk:  # a snapshot chain, read-only
        assert disk.read(0, 1100) == b"parent data" * 100
