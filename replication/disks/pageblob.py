"""Azure page blobs as disks: a fixed VHD (an Azure VM disk) or raw bytes.

Spec syntax (accepted by :func:`~replication.disks.open_disk` and ``create_disk``)
----------------------------------------------------------------------------------
* ``pageblob+https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB``: the blob URL
  with ``pageblob+`` in front (``pageblob+http://127.0.0.1:10000/ACCOUNT/CONTAINER/BLOB``
  for Azurite's path-style URLs).
* ``pageblob:CONTAINER/BLOB``: the account endpoint and credentials come from
  ``AZURE_STORAGE_CONNECTION_STRING``.

Query parameters: ``format=vhd|raw`` (ours, never sent) forces the view;
``snapshot=TIME`` opens a blob snapshot (read-only); anything else is taken as a
SAS token. Without ``format``, a blob whose last 512 bytes start with ``conectix``
is a VHD and anything else is raw, as for local files.

Credentials, first found wins: a SAS in the spec, ``AZURE_STORAGE_SAS_TOKEN``,
``AZURE_STORAGE_KEY`` (account key; the account name comes from the URL),
``AZURE_STORAGE_CONNECTION_STRING`` (its ``AccountKey`` or
``SharedAccessSignature``), else anonymous. A rejected key or SAS is a
:class:`~replication.errors.ConfigError`; other service and network failures are
:class:`~replication.errors.DiskIOError`.

Views
-----
* **vhd**: an Azure VM disk page blob is a fixed VHD: the disk's bytes, then a
  512-byte footer. The footer is parsed and validated by ``vhd_format`` (checksum,
  fixed type, blob size == current size + 512); the virtual size is the blob size
  minus 512, so writes can never reach the footer.
* **raw**: the whole blob (a blob's size is always a multiple of 512).

I/O
---
Every REST call moves at most 4 MiB (Azure's Put Page limit), cut at multiples of
4 MiB of the blob offset, so a block of 4 MiB or less is written by exactly one call
(we rely on Azure applying a Put Page request whole or not at all). Writes are page-aligned: partial
512-byte pages at the edges are read, merged and written back (one writer at a time,
per the Disk contract). A page-aligned chunk that is all zeros is cleared instead of
written, and ``write_zeroes`` clears pages, so zeros never allocate pages.

Durability: Put Page and Clear Page return only once Azure has committed the pages
(201 Created), so :meth:`flush` has nothing left to do.

Extents come from the plain page-range list (allocated pages; unallocated pages read
as zeros): the hash map skips the rest. Snapshot *diffs* are never used (Azurite
answers them wrongly, see shared/oracles.md). ``generation()`` is the blob's ETag,
which the service changes on every write by anyone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ..errors import (
    ConfigError,
    CorruptHeaderError,
    DiskIOError,
    DiskReadOnlyError,
    UnsupportedFormatError,
    UsageError,
)
from .base import Disk, DiskInfo, Extent, zero_buffer
from .vhd_format import FOOTER_SIZE, MAX_CHS, Footer, build_footer, parse_footer

__all__ = [
    "PageBlobDisk",
    "create_pageblob",
    "is_pageblob_spec",
    "open_pageblob",
    "parse_spec",
]

PAGE = 512
MAX_CALL = 4 << 20  # bytes per Put Page / Get Blob call (Azure's Put Page limit)
CLEAR_WINDOW = 1 << 30  # bytes per Clear Page call (a multiple of MAX_CALL)
RANGE_WINDOW = 64 << 30  # bytes of blob per page-range listing (paged within)
MiB = 1 << 20
URL_PREFIXES = ("pageblob+https://", "pageblob+http://")
CONN_PREFIX = "pageblob:"
_OUR_PARAMS = ("format", "snapshot")
#: the SDK logs every request and response at INFO: in an agent (root logger at INFO)
#: that is a dozen lines per 4 MiB written, burying the agent's own events
_SDK_HTTP_LOGGER = "azure.core.pipeline.policies.http_logging_policy"


def is_pageblob_spec(path: str) -> bool:
    """Whether ``path`` names a page blob rather than a local file."""
    return path.startswith(URL_PREFIXES) or path.startswith(CONN_PREFIX)


@dataclass(frozen=True)
class BlobSpec:
    """A parsed spec: where the blob is and how to reach it (no secret in ``display``)."""

    display: str  # pageblob+URL without SAS: the disk's path in reports and caches
    url: str | None  # blob URL without query (URL form)
    container: str
    blob: str
    format: str | None
    snapshot: str | None
    sas: str | None  # SAS from the spec itself


def parse_spec(spec: str) -> BlobSpec:
    """Parse a ``pageblob+URL`` or ``pageblob:CONTAINER/BLOB`` spec (no network)."""
    if spec.startswith(URL_PREFIXES):
        parts = urlsplit(spec[len("pageblob+") :])
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        segments = [s for s in parts.path.split("/") if s]
        path_style = _is_ip_host(parts.hostname or "")
        if len(segments) < (3 if path_style else 2) or not parts.hostname:
            raise UsageError(
                f"{_redact(spec)}: expected pageblob+https://ACCOUNT.blob.core.windows.net/"
                "CONTAINER/BLOB (or pageblob+http://HOST:PORT/ACCOUNT/CONTAINER/BLOB)"
            )
        first = 1 if path_style else 0
        container, blob = segments[first], "/".join(segments[first + 1 :])
    elif spec.startswith(CONN_PREFIX):
        parts = urlsplit(spec[len(CONN_PREFIX) :])
        container, _, blob = parts.path.strip("/").partition("/")
        if not container or not blob:
            raise UsageError(f"{_redact(spec)}: expected pageblob:CONTAINER/BLOB")
        url = None
    else:
        raise UsageError(f"{spec!r} is not a page blob spec")
    params = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in params if k in _OUR_PARAMS}
    sas = urlencode([(k, v) for k, v in params if k not in _OUR_PARAMS]) or None
    fmt = ours.get("format")
    if fmt not in (None, "vhd", "raw"):
        raise UsageError(f"{_redact(spec)}: format={fmt!r}; expected vhd or raw")
    display = "pageblob+" + url if url else f"{CONN_PREFIX}{container}/{blob}"
    if ours.get("snapshot"):
        display += f"?snapshot={ours['snapshot']}"
    return BlobSpec(display, url, container, blob, fmt, ours.get("snapshot") or None, sas)


def _is_ip_host(host: str) -> bool:
    """Path-style URLs (account in the path): IP addresses and localhost, as Azurite."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _redact(spec: str) -> str:
    """The spec with any SAS signature hidden (for error messages)."""
    head, sep, query = spec.partition("?")
    if not sep:
        return spec
    kept = [(k, "REDACTED" if k == "sig" else v) for k, v in parse_qsl(query, True)]
    return f"{head}?{urlencode(kept)}"


# -- errors ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _azure(context: str) -> Iterator[None]:
    """Turn the SDK's exceptions into the engine's typed errors."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
    )

    try:
        yield
    except ResourceNotFoundError as err:
        raise DiskIOError(f"{context}: {_code(err) or 'not found'}") from err
    except (ClientAuthenticationError, HttpResponseError) as err:
        status = getattr(err, "status_code", None)
        if isinstance(err, ClientAuthenticationError) or status in (401, 403):
            raise ConfigError(
                f"{context}: access denied ({_code(err) or status or 'bad credential'})",
                hint="check AZURE_STORAGE_KEY / the SAS token and its permissions",
            ) from err
        raise DiskIOError(f"{context}: HTTP {status} {_code(err)}".rstrip()) from err
    except AzureError as err:
        raise DiskIOError(f"{context}: {_first_line(str(err))}") from err


def _code(err: Exception) -> str:
    code = getattr(err, "error_code", None)
    code = getattr(code, "value", code)
    return str(code) if code else _first_line(getattr(err, "reason", "") or "")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# -- clients ---------------------------------------------------------------------------------


def _client(spec: BlobSpec):
    """A ``BlobClient`` for ``spec`` with the credential from the spec or the environment."""
    try:
        from azure.storage.blob import BlobClient, ExponentialRetry
    except ModuleNotFoundError as err:  # pragma: no cover - a dependency of the package
        raise UnsupportedFormatError(
            "page blob disks need the azure-storage-blob package (pip install azure-storage-blob)"
        ) from err
    logging.getLogger(_SDK_HTTP_LOGGER).setLevel(logging.WARNING)
    retry = ExponentialRetry(
        initial_backoff=1, increment_base=2, retry_total=3, random_jitter_range=1
    )  # waits of about 1, 3 and 5 s
    kwargs = {"retry_policy": retry, "connection_timeout": 20, "read_timeout": 120}
    if spec.snapshot:
        kwargs["snapshot"] = spec.snapshot
    env = os.environ
    if spec.url is None:
        conn = env.get("AZURE_STORAGE_CONNECTION_STRING")
        if not conn:
            raise ConfigError(
                f"{spec.display}: AZURE_STORAGE_CONNECTION_STRING is not set",
                hint="set it, or give the blob as pageblob+https://ACCOUNT.../CONTAINER/BLOB",
            )
        credential = spec.sas or env.get("AZURE_STORAGE_SAS_TOKEN")
        with _config_errors(spec.display):
            return BlobClient.from_connection_string(
                conn, spec.container, spec.blob, credential=credential, **kwargs
            )
    with _config_errors(spec.display):
        account = BlobClient.from_blob_url(spec.url).account_name
        if spec.sas:
            return BlobClient.from_blob_url(f"{spec.url}?{spec.sas}", **kwargs)
        return BlobClient.from_blob_url(spec.url, credential=_env_credential(account), **kwargs)


def _env_credential(account: str | None):
    env = os.environ
    if env.get("AZURE_STORAGE_SAS_TOKEN"):
        return env["AZURE_STORAGE_SAS_TOKEN"]
    if env.get("AZURE_STORAGE_KEY"):
        return {"account_name": account, "account_key": env["AZURE_STORAGE_KEY"]}
    fields = _parse_connection_string(env.get("AZURE_STORAGE_CONNECTION_STRING", ""))
    if fields.get("accountname", account) != account:
        return None  # the connection string is for another account
    if fields.get("accountkey"):
        return {"account_name": account, "account_key": fields["accountkey"]}
    return fields.get("sharedaccesssignature")


def _parse_connection_string(conn: str) -> dict[str, str]:
    fields = {}
    for item in conn.split(";"):
        key, sep, value = item.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


@contextlib.contextmanager
def _config_errors(where: str) -> Iterator[None]:
    try:
        yield
    except ValueError as err:  # the SDK's refusal of a malformed URL or connection string
        raise ConfigError(f"{where}: {_first_line(str(err))}") from err


# -- opening and creating --------------------------------------------------------------------


def open_pageblob(path: str, *, writable: bool = False, format: str | None = None) -> PageBlobDisk:
    """Open the page blob named by ``path`` as a fixed VHD or raw disk."""
    spec = parse_spec(path)
    fmt = format or spec.format
    if fmt not in (None, "vhd", "raw"):
        raise UnsupportedFormatError(f"{spec.display}: a page blob is a vhd or raw disk, not {fmt}")
    if writable and spec.snapshot:
        raise DiskReadOnlyError(f"{spec.display}: a blob snapshot cannot be written")
    client = _client(spec)
    try:
        return _open_client(spec, client, writable, fmt)
    except BaseException:
        client.close()
        raise


def _open_client(spec: BlobSpec, client, writable: bool, fmt: str | None) -> PageBlobDisk:
    with _azure(f"open {spec.display}"):
        props = client.get_blob_properties()
    kind = getattr(props.blob_type, "value", props.blob_type)
    if kind != "PageBlob":
        raise UnsupportedFormatError(f"{spec.display}: a {kind} is not a page blob")
    size = int(props.size)
    tail = b""
    if size >= FOOTER_SIZE and fmt != "raw":
        with _azure(f"read {spec.display} footer"):
            tail = client.download_blob(offset=size - FOOTER_SIZE, length=FOOTER_SIZE).readall()
    footer = None
    if fmt == "vhd" or (fmt is None and tail[:8] == b"conectix"):
        footer = _check_footer(spec.display, tail, size)
    return PageBlobDisk(spec, client, size, footer, writable=writable)


def _check_footer(where: str, tail: bytes, size: int) -> Footer:
    if size < FOOTER_SIZE:
        raise CorruptHeaderError(f"{where}: blob of {size} bytes is too small for a VHD footer")
    footer = parse_footer(tail, f"{where} (VHD footer)")
    if footer.disk_type != 2:
        raise UnsupportedFormatError(
            f"{where}: VHD disk type {footer.disk_type} in a page blob; Azure disks are fixed (2)"
        )
    if size != footer.current_size + FOOTER_SIZE:
        raise CorruptHeaderError(
            f"{where}: fixed VHD of current size {footer.current_size} must be a blob of "
            f"{footer.current_size + FOOTER_SIZE} bytes, not {size}"
        )
    return footer


def create_pageblob(
    path: str, size: int, *, format: str = "raw", subformat: str | None = None
) -> PageBlobDisk:
    """Create an empty page blob (refuses to overwrite); as a fixed VHD, write its footer."""
    spec = parse_spec(path)
    if format not in ("vhd", "raw") or (format == "vhd" and subformat not in (None, "fixed")):
        raise UnsupportedFormatError(
            f"{spec.display}: a page blob is created as raw or as a fixed vhd, not "
            f"{format}{'/' + subformat if subformat else ''}"
        )
    if spec.snapshot:
        raise UsageError(f"{spec.display}: cannot create a blob snapshot")
    if size <= 0 or size % PAGE:
        raise UsageError(f"page blob size {size} must be a positive multiple of 512 bytes")
    blob_size = size + (FOOTER_SIZE if format == "vhd" else 0)
    client = _client(spec)
    try:
        with _azure(f"create {spec.display}"):
            _create(client, spec.display, blob_size)
            if format == "vhd":
                import uuid

                footer = build_footer(size, 2, 0xFFFFFFFFFFFFFFFF, uuid.uuid4())
                client.upload_page(footer, offset=size, length=FOOTER_SIZE)
        return _open_client(spec, client, True, format)
    except BaseException:
        client.close()
        raise


def _create(client, where: str, blob_size: int) -> None:
    from azure.core.exceptions import ResourceExistsError

    try:
        client.create_page_blob(blob_size, if_none_match="*")
    except ResourceExistsError as err:
        raise UsageError(f"{where}: the blob already exists") from err


# -- the disk --------------------------------------------------------------------------------


class PageBlobDisk(Disk):
    """A page blob seen as a fixed VHD (``footer`` set) or as raw bytes."""

    def __init__(
        self, spec: BlobSpec, client, blob_size: int, footer: Footer | None, *, writable: bool
    ) -> None:
        virtual = blob_size - FOOTER_SIZE if footer else blob_size
        super().__init__(spec.display, virtual, writable=writable)
        self.format_name = "vhd" if footer else "raw"
        self.spec = spec
        self.blob_size = blob_size
        self.footer = footer
        self._client = client

    @property
    def identity(self) -> str:
        """Which blob this is, whatever the spec's form: ``pageblob+URL[?snapshot=…]``.

        ``path`` of a ``pageblob:CONTAINER/BLOB`` spec does not name the account (the
        connection string does), so caches key on this instead. No SAS in it.
        """
        url = self._client.url.partition("?")[0]
        snapshot = f"?snapshot={self.spec.snapshot}" if self.spec.snapshot else ""
        return f"pageblob+{url}{snapshot}"

    # -- reads ---------------------------------------------------------------------------

    def _read_into(self, offset: int, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            n = min(MAX_CALL - (offset + pos) % MAX_CALL, len(view) - pos)
            with _azure(f"read {self.path} at {offset + pos}"):
                data = self._client.download_blob(offset=offset + pos, length=n).readall()
            if len(data) != n:
                raise DiskIOError(f"read {self.path} at {offset + pos}: {len(data)} of {n} bytes")
            view[pos : pos + n] = data
            pos += n

    # -- writes --------------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        pos = offset - offset % PAGE
        while pos < end:
            stop = min(pos - pos % MAX_CALL + MAX_CALL, -(-end // PAGE) * PAGE)
            self._put(pos, self._pages(pos, stop, offset, view))
            pos = stop

    def _pages(self, start: int, stop: int, offset: int, view: memoryview) -> memoryview:
        """Bytes of the pages [start, stop): ``view`` merged over the old partial edge pages."""
        lo, hi = max(start, offset), min(stop, offset + len(view))
        if lo == start and hi == stop:
            return view[start - offset : stop - offset]
        buf = memoryview(bytearray(stop - start))
        if lo > start:
            self._read_into(start, buf[:PAGE])
        if hi < stop and not (lo > start and stop - start == PAGE):
            self._read_into(stop - PAGE, buf[-PAGE:])
        buf[lo - start : hi - start] = view[lo - offset : hi - offset]
        return buf

    def _put(self, offset: int, pages: memoryview) -> None:
        """Write whole pages in one call; all-zero pages are cleared, never allocated."""
        where = f"write {self.path} at {offset}"
        with _azure(where):
            if not np.frombuffer(pages, dtype=np.uint8).any():
                self._client.clear_page(offset=offset, length=len(pages))
            else:
                self._client.upload_page(bytes(pages), offset=offset, length=len(pages))

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        first, last = -(-offset // PAGE) * PAGE, end - end % PAGE
        if first >= last:  # no whole page inside: merge zeros into the edge page(s)
            self._write(offset, zero_buffer(length))
            return
        if offset < first:
            self._write(offset, zero_buffer(first - offset))
        pos = first
        while pos < last:
            stop = min(pos - pos % CLEAR_WINDOW + CLEAR_WINDOW, last)
            with _azure(f"clear {self.path} at {pos}"):
                self._client.clear_page(offset=pos, length=stop - pos)
            pos = stop
        if end > last:
            self._write(last, zero_buffer(end - last))

    def _flush(self) -> None:
        return None  # Put Page and Clear Page are durable when they return

    # -- extents and generation ----------------------------------------------------------

    def _extents(self) -> Iterator[Extent]:
        pos = 0
        for start, end in self._allocated(self.virtual_size):
            if start > pos:
                yield Extent(pos, start - pos, zero=True)
            yield Extent(start, end - start, zero=False)
            pos = end
        if pos < self.virtual_size:
            yield Extent(pos, self.virtual_size - pos, zero=True)

    def _allocated(self, limit: int) -> Iterator[tuple[int, int]]:
        """Coalesced allocated [start, end) ranges below ``limit``, in order."""
        pending: tuple[int, int] | None = None
        for start, end in self._page_ranges(limit):
            if pending and start <= pending[1]:
                pending = (pending[0], max(pending[1], end))
                continue
            if pending:
                yield pending
            pending = (start, end)
        if pending:
            yield pending

    def _page_ranges(self, limit: int) -> Iterator[tuple[int, int]]:
        """The service's page ranges, window by window, clipped to [0, limit)."""
        last = 0
        for window in range(0, limit, RANGE_WINDOW):
            w_end = min(limit, window + RANGE_WINDOW)
            where = f"list page ranges of {self.path} at {window}"
            with _azure(where):
                ranges = iter(self._client.list_page_ranges(offset=window, length=w_end - window))
            while True:
                with _azure(where):
                    r = next(ranges, None)
                if r is None:
                    break
                start, end = max(r.start, window), min(r.end + 1, w_end)
                if r.cleared or start >= end:
                    continue
                if start < last:
                    raise DiskIOError(f"{where}: the service listed page ranges out of order")
                last = end
                yield start, end

    def generation(self) -> str | None:
        from azure.core.exceptions import AzureError

        try:
            props = self._client.get_blob_properties()
        except AzureError:
            return None  # cannot tell: never trust a kept map
        return f"pageblob:{self.format_name}:{props.etag}:{props.size}"

    # -- info and close ------------------------------------------------------------------

    def info(self) -> DiskInfo:
        self._check_open()
        allocated = sum(e - s for s, e in self._allocated(self.blob_size))
        extra: dict[str, object] = {
            "storage": "azure-page-blob",
            "blob_size": self.blob_size,
            "snapshot": self.spec.snapshot,
        }
        notes: list[str] = []
        if self.footer is not None:
            notes = _azure_notes(self.virtual_size, self.footer)
            extra.update(
                creator_app=self.footer.creator_text,
                disk_type=self.footer.disk_type,
                geometry=list(self.footer.geometry),
                original_size=self.footer.original_size,
            )
        return DiskInfo(
            path=self.path,
            format=self.format_name,
            subformat="fixed" if self.footer else "page-blob",
            virtual_size=self.virtual_size,
            allocated_bytes=allocated,
            uuid=str(self.footer.unique_id) if self.footer else None,
            writable=self.spec.snapshot is None,
            notes=tuple(notes),
            extra=extra,
        )

    def _close(self) -> None:
        self._client.close()


def _azure_notes(size: int, footer: Footer) -> list[str]:
    """Azure's rules for a VM disk (as ``replication disk info`` reports for VHD files)."""
    notes = []
    if size % MiB:
        notes.append(f"azure: size {size} is not a whole number of MiB; Azure will reject it")
    if not 20 * MiB <= size <= 32 << 40:
        notes.append("azure: size is outside Azure's range of 20 MiB to 32 TiB")
    if footer.chs_size != size and footer.geometry != MAX_CHS:
        notes.append(
            f"CHS geometry {footer.geometry} gives {footer.chs_size} bytes; using the current "
            f"size {size} (old qemu reads creator {footer.creator_text!r} disks by CHS)"
        )
    return notes
