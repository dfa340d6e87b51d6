"""The fixed mmap threshold: large freed buffers go back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from replication.heap import return_large_buffers

#: four threads each allocate and free 16 MiB windows, as the hash-map path does,
#: after the first freed mapping has raised glibc's dynamic threshold
MODEL = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    from replication.heap import return_large_buffers
    if sys.argv[1] == "fixed":
        assert return_large_buffers()
    def windows():
        for _ in range(40):
            a = np.zeros(1 << 20, dtype="V16")
            b = np.zeros(1 << 20, dtype="V16")
            small = [bytearray(100_000) for _ in range(50)]
            del a, b, small
    threads = [threading.Thread(target=windows) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print(int(peak.split()[1]) * 1024)
    """
)


def peak_of(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", MODEL, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_it_applies_on_this_glibc_machine():
    assert return_large_buffers() is True


def test_windows_freed_by_several_threads_do_not_pile_up():
    # at most the four threads' live windows (4 x 32 MiB) plus the interpreter and
    # numpy: the dynamic threshold keeps freed windows in the arenas instead
    fixed = peak_of("fixed")
    assert fixed < 4 * (32 << 20) + (64 << 20), fixed
    assert fixed < peak_of("default"), "the model no longer shows the retention"
