"""The VMDK text descriptor: parse it, change its CID, write it back.

A descriptor is a small UTF-8 text (``\\n`` line ends, ``#`` comments) made of
``key=value`` lines, extent lines (``ACCESS SECTORS TYPE "FILE" [OFFSET]``) and the
disk database (``ddb.key = "value"``). It lives either in its own file or embedded
in a monolithic sparse extent (sector ``descriptorOffset``), padded with NULs, so the
parser stops at the first NUL (qemu also pads separate descriptor files with NULs).

We keep the original lines and change only the ``CID`` (and the tail of
``ddb.longContentID``) when writing, so every key we do not understand survives.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from ...errors import CorruptHeaderError

__all__ = [
    "NO_PARENT_CID",
    "Descriptor",
    "ExtentLine",
    "looks_like_descriptor",
    "new_cid",
    "parse_descriptor",
    "render_descriptor",
]

#: parentCID of a disk without parent.
NO_PARENT_CID = "ffffffff"
#: larger text is not a descriptor (real ones are < 2 KiB; qemu reads at most 10 KiB)
MAX_DESCRIPTOR_BYTES = 64 * 1024
#: more extents than this is hostile (a 62 TiB disk in 2 GiB pieces has 31744)
MAX_EXTENTS = 65536

_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)")?(?:\s+(\d+))?\s*$'
)
_KEY_RE = re.compile(r"^([A-Za-z][\w.:-]*)\s*=\s*(.*?)\s*$")
_CID_RE = re.compile(r"^[0-9a-fA-F]{1,8}$")


@dataclass(frozen=True)
class ExtentLine:
    """One extent line: access, size in sectors, type, file name, start offset (sectors)."""

    access: str  # RW | RDONLY | NOACCESS
    sectors: int
    type: str  # SPARSE | FLAT | VMFS | ZERO | VMFSSPARSE | SESPARSE | ...
    filename: str | None
    offset: int = 0


@dataclass
class Descriptor:
    """A parsed descriptor; ``lines`` keeps the text for a faithful rewrite."""

    lines: list[str]
    fields: dict[str, str] = field(default_factory=dict)  # header keys and ddb.* keys
    extents: list[ExtentLine] = field(default_factory=list)
    encoding: str = "utf-8"  # how the text was decoded, and is encoded back

    @property
    def cid(self) -> str:
        return self.fields.get("CID", "").lower()

    @property
    def parent_cid(self) -> str:
        return self.fields.get("parentCID", NO_PARENT_CID).lower()

    @property
    def create_type(self) -> str:
        return self.fields.get("createType", "")

    @property
    def parent_hint(self) -> str | None:
        return self.fields.get("parentFileNameHint") or None

    def has_parent(self) -> bool:
        """True when the descriptor says this disk is a snapshot delta (has a parent)."""
        return self.parent_cid != NO_PARENT_CID or self.parent_hint is not None

    def with_cid(self, cid: str) -> Descriptor:
        """Return a copy whose CID (and ddb.longContentID tail) is ``cid``."""
        lines = []
        for line in self.lines:
            key = _key_of(line)
            if key == "CID":
                line = f"CID={cid}"
            elif key == "ddb.longContentID":
                # VMware keeps the last 8 hex digits of longContentID equal to CID.
                old = self.fields["ddb.longContentID"]
                if len(old) == 32 and all(c in "0123456789abcdefABCDEF" for c in old):
                    line = f'ddb.longContentID = "{old[:24]}{cid}"'
            lines.append(line)
        rendered = render_descriptor(Descriptor(lines, encoding=self.encoding))
        return parse_descriptor(rendered, "rewritten descriptor")


def new_cid(avoid: str = "") -> str:
    """Return a random CID (8 hex digits), different from ``avoid`` and from ffffffff."""
    while True:
        cid = f"{secrets.randbits(32):08x}"
        if cid not in (avoid.lower(), NO_PARENT_CID):
            return cid


def looks_like_descriptor(data: bytes) -> bool:
    """True when ``data`` (the start of a file) looks like a text descriptor."""
    text = data.split(b"\0", 1)[0]
    return text.startswith(b"# Disk DescriptorFile") or b"createType" in text[:4096]


def parse_descriptor(data: bytes | str, where: str) -> Descriptor:
    """Parse descriptor text (``bytes`` stops at the first NUL); raise CorruptHeaderError.

    Text that is not UTF-8 is read as latin-1 (VMware's windows-1252 descriptors).
    """
    if isinstance(data, bytes):
        data = data.split(b"\0", 1)[0]
        if len(data) > MAX_DESCRIPTOR_BYTES:
            raise CorruptHeaderError(f"{where}: descriptor larger than {MAX_DESCRIPTOR_BYTES} B")
        encoding = "utf-8"
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            # older VMware descriptors say encoding="windows-1252"; latin-1 maps every
            # byte, so a rewrite gives back the same bytes for lines we do not touch
            encoding = "latin-1"
            text = data.decode(encoding)
    else:
        text, encoding = data, "utf-8"
    desc = Descriptor(lines=text.replace("\r\n", "\n").split("\n"), encoding=encoding)
    for number, raw_line in enumerate(desc.lines, 1):
        _parse_line(desc, raw_line.strip(), f"{where} line {number}")
    _validate(desc, where)
    return desc


def _parse_line(desc: Descriptor, line: str, where: str) -> None:
    if not line or line.startswith("#"):
        return
    m = _EXTENT_RE.match(line)
    if m:
        access, sectors, etype, fname, offset = m.groups()
        desc.extents.append(
            ExtentLine(access, int(sectors), etype.upper(), fname, int(offset or 0))
        )
        return
    m = _KEY_RE.match(line)
    if not m:
        raise CorruptHeaderError(f"{where}: not a descriptor line: {line[:60]!r}")
    key, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    desc.fields[key] = value


def _validate(desc: Descriptor, where: str) -> None:
    """Flat list of checks on the parsed descriptor."""
    if not desc.extents:
        raise CorruptHeaderError(f"{where}: descriptor has no extent lines")
    if len(desc.extents) > MAX_EXTENTS:
        raise CorruptHeaderError(f"{where}: {len(desc.extents)} extents is too many")
    if "createType" not in desc.fields:
        raise CorruptHeaderError(f"{where}: descriptor has no createType")
    if not _CID_RE.match(desc.fields.get("CID", "")):
        raise CorruptHeaderError(f"{where}: descriptor has no valid CID")
    if not _CID_RE.match(desc.parent_cid):
        raise CorruptHeaderError(f"{where}: descriptor parentCID is not 8 hex digits")
    for ext in desc.extents:
        if ext.sectors <= 0 or ext.sectors >= 1 << 40:
            raise CorruptHeaderError(f"{where}: extent size {ext.sectors} sectors is invalid")
        if ext.offset >= 1 << 40:
            raise CorruptHeaderError(f"{where}: extent offset {ext.offset} is invalid")
        if ext.type != "ZERO" and not ext.filename:
            raise CorruptHeaderError(f"{where}: {ext.type} extent without a file name")
        if ext.filename is not None and ("\0" in ext.filename or "\n" in ext.filename):
            raise CorruptHeaderError(f"{where}: extent file name has control characters")


def render_descriptor(desc: Descriptor) -> bytes:
    """Return the descriptor text as bytes, ending in exactly one newline."""
    text = "\n".join(desc.lines).rstrip("\n") + "\n"
    return text.encode(desc.encoding)


def _key_of(line: str) -> str | None:
    m = _KEY_RE.match(line.strip())
    if not m or line.strip().startswith("#") or _EXTENT_RE.match(line.strip()):
        return None
    return m.group(1)
