"""The ``Disk`` contract shared by every disk format.

A :class:`Disk` is a fixed-size array of bytes (its *virtual size*) stored in some
container format (raw file or block device, VHD, VMDK). Callers see only virtual
offsets; the format maps them onto its files.

Contract (every implementation MUST honour it; ``tests/contract/`` checks it):

* ``read_into(offset, buf)`` fills all of ``buf`` with the disk's bytes at
  ``offset``. Unallocated regions read as zeros. It is safe to call from several
  threads at once (implementations use ``os.pread``/``os.preadv`` only and keep no
  file position).
* ``write(offset, data)`` stores ``data`` at ``offset``. It raises
  :class:`~replication.errors.DiskReadOnlyError` on a disk opened read-only or whose
  format cannot be written, and never writes anything in that case. Writes are not
  thread-safe: one writer at a time.
* Any range that does not lie inside ``[0, virtual_size)`` raises
  :class:`~replication.errors.OutOfRangeError` *before* any byte is read or written.
* ``write_zeroes(offset, length)`` makes the range read as zeros without allocating
  space where the format allows it (sparse formats never allocate a grain or block
  for zeros).
* ``flush()`` returns only after every write issued before it, data and metadata,
  is durable (``fsync`` of every file touched). After a crash without ``flush()``
  each written block holds either its old or its new content, and the container
  stays consistent (formats order their metadata updates for this).
* ``extents()`` yields :class:`Extent` records that cover ``[0, virtual_size)`` in
  order without gaps. ``zero=True`` promises the range reads as zeros (a hole or an
  unallocated grain); ``zero=False`` makes no promise either way.
* ``generation()`` returns a string that changes whenever the disk's content may
  have changed since it was last taken (used to decide whether a hash map kept
  from the last sync can be trusted). ``None`` means "cannot tell": never trust.
* ``close()`` is idempotent. A closed disk raises ``ValueError`` on I/O.
* OS failures surface as :class:`~replication.errors.DiskIOError` (``ENOSPC`` as
  :class:`~replication.errors.DiskFullError`), with the ``OSError`` as ``__cause__``.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import TracebackType

from ..errors import DiskFullError, DiskIOError, DiskReadOnlyError, OutOfRangeError

__all__ = ["Disk", "DiskInfo", "Extent", "io_error", "zero_buffer"]

_ZERO_CHUNK = bytes(1 << 20)


def zero_buffer(length: int) -> memoryview:
    """Return a read-only view of ``length`` zero bytes (shared, up to 1 MiB)."""
    if length <= len(_ZERO_CHUNK):
        return memoryview(_ZERO_CHUNK)[:length]
    return memoryview(bytes(length))


def io_error(context: str, err: OSError) -> DiskIOError:
    """Wrap an ``OSError`` in the engine's typed disk error (``ENOSPC`` -> DiskFullError)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{context}: no space left on device")
    return DiskIOError(f"{context}: {err.strerror or err}")


@dataclass(frozen=True)
class Extent:
    """A range of virtual bytes; ``zero`` promises that the range reads as zeros."""

    offset: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskInfo:
    """What ``replication disk info`` reports about a disk."""

    path: str
    format: str  # "raw" | "vhd" | "vmdk"
    subformat: str  # e.g. "file", "block-device", "fixed", "dynamic", "monolithicSparse"
    virtual_size: int
    allocated_bytes: int
    grain_size: int | None = None  # bytes; VMDK grain or VHD block size
    parent: str | None = None
    uuid: str | None = None
    cid: str | None = None
    files: tuple[str, ...] = ()
    writable: bool = True  # whether the format and chain position allow writing
    notes: tuple[str, ...] = ()  # human-readable findings (Azure size rule, snapshots)
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """Return the info as a JSON-friendly dict."""
        d = asdict(self)
        d["files"] = list(self.files)
        d["notes"] = list(self.notes)
        return d


class Disk(abc.ABC):
    """A virtual disk; see the module docstring for the contract."""

    #: short format name, e.g. "raw"
    format_name: str = "?"

    def __init__(self, path: str, virtual_size: int, *, writable: bool) -> None:
        self.path = path
        self.virtual_size = virtual_size
        self.writable = writable
        self.closed = False

    # -- public API: validates, then delegates to the format --------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``."""
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (thread-safe)."""
        view = memoryview(buf).cast("B")
        self._check_open()
        self._check_range(offset, len(view))
        if len(view):
            self._read_into(offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if len(view):
            self._write(offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, without allocating if possible."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._write_zeroes(offset, length)

    def flush(self) -> None:
        """Make every earlier write durable."""
        self._check_open()
        if self.writable:
            self._flush()

    def extents(self) -> Iterator[Extent]:
        """Yield extents covering the whole disk, in order."""
        self._check_open()
        return self._extents()

    def generation(self) -> str | None:
        """Return a token that changes whenever the content may have changed."""
        return None

    def mark_generation(self) -> str | None:
        """After our own writes and flush, make ``generation()`` distinctive and return it.

        Formats whose generation is based on file times set a unique modification
        time here, so that any later write by anyone changes the token.
        """
        return self.generation()

    @abc.abstractmethod
    def info(self) -> DiskInfo:
        """Return what ``disk info`` reports."""

    def close(self) -> None:
        """Release the disk's files; idempotent."""
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> Disk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- to implement -------------------------------------------------------------------

    @abc.abstractmethod
    def _read_into(self, offset: int, view: memoryview) -> None: ...

    def _write(self, offset: int, view: memoryview) -> None:
        raise DiskReadOnlyError(f"{self.path}: {self.format_name} disks cannot be written")

    def _write_zeroes(self, offset: int, length: int) -> None:
        # Generic fallback; sparse formats override it to avoid allocating.
        pos = offset
        while pos < offset + length:
            n = min(len(_ZERO_CHUNK), offset + length - pos)
            self._write(pos, zero_buffer(n))
            pos += n

    def _flush(self) -> None:
        return None

    def _extents(self) -> Iterator[Extent]:
        yield Extent(0, self.virtual_size, zero=False)

    def _close(self) -> None:
        return None

    # -- checks ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: disk is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise DiskReadOnlyError(f"{self.path}: disk was opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise OutOfRangeError(
                f"{self.path}: range [{offset}, {offset + length}) lies outside the disk "
                f"of {self.virtual_size} bytes"
            )


def file_generation(paths: list[str] | tuple[str, ...], extra: str = "") -> str | None:
    """Return a generation token from the identity and times of ``paths``.

    Any write through the file system changes ``st_mtime_ns`` to the current time;
    :func:`stamp_files` sets it to a distinctive past value after our own writes, so
    a later write cannot leave it unchanged even with coarse timestamps.
    """
    parts = [extra]
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        if not _is_regular(st.st_mode):
            return None  # block devices do not record writes in their times
        parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def stamp_files(paths: list[str] | tuple[str, ...]) -> None:
    """Set each file's mtime to a unique instant one second in the past."""
    import secrets
    import time

    for p in paths:
        st = os.stat(p)
        if not _is_regular(st.st_mode):
            continue
        past = time.time_ns() - 1_000_000_000 - secrets.randbelow(1_000_000)
        os.utime(p, ns=(st.st_atime_ns, past))


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)
