"""``replication frame``: inspect and make block frames.

* ``replication frame inspect FILE [--secret-file F] [--json]`` prints the header
  fields of every frame in FILE (frames stored back to back). With a secret it
  also decrypts and verifies each one (plaintext length, digest, compression).
* ``replication frame encode --secret-file F --disk-id HEX --seq N --offset N
  INPUT OUTPUT`` encodes INPUT as one frame, or as several consecutive frames
  (seq, seq+1, ...) with ``--block-size``.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..frame import (
    MAX_FRAME_LENGTH,
    FrameDecoder,
    FrameEncoder,
    FrameHeader,
    frame_size,
    peek_header,
)
from ..keys import load_secret

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``frame`` command and its ``inspect`` and ``encode`` sub-commands."""
    parser = subparsers.add_parser("frame", help="inspect or make block frames")
    sub = parser.add_subparsers(dest="frame_command", metavar="ACTION", required=True)

    p = sub.add_parser("inspect", help="print frame headers; verify them with a secret")
    p.add_argument("file", type=Path, metavar="FILE", help="file of one or more frames")
    p.add_argument("--secret-file", type=Path, help="shared secret: decrypt and verify")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run, action=_inspect)

    p = sub.add_parser("encode", help="encode a file as block frame(s)")
    p.add_argument("--secret-file", type=Path, required=True, help="shared secret file")
    p.add_argument("--disk-id", required=True, help="16-byte disk id: 32 hex digits or a UUID")
    p.add_argument("--seq", type=int, required=True, help="sequence number of the first frame")
    p.add_argument("--offset", type=int, required=True, help="disk byte offset of INPUT")
    p.add_argument("--level", type=int, default=1, help="zstd level (default 1)")
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="split INPUT into frames of this many bytes (default: one frame)",
    )
    p.add_argument("--salt", help="fixed 16-byte session salt in hex (tests and fixtures ONLY)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("input", type=Path, metavar="INPUT")
    p.add_argument("output", type=Path, metavar="OUTPUT")
    p.set_defaults(func=run, action=_encode)


def run(args: argparse.Namespace) -> int:
    """Run the selected ``frame`` action."""
    return int(args.action(args))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from err


def _hex_arg(name: str, text: str, size: int) -> bytes:
    try:
        value = uuid.UUID(text).bytes if "-" in text else bytes.fromhex(text)
    except ValueError as err:
        raise UsageError(f"{name} {text!r} is not hex or a UUID") from err
    if len(value) != size:
        raise UsageError(f"{name} must be {size} bytes, not {len(value)}")
    return value


def _header_record(header: FrameHeader, position: int) -> dict[str, Any]:
    return {
        "position": position,
        "magic": header.magic.decode("ascii", "replace"),
        "version": header.version,
        "flags": header.flags,
        "compressed": header.compressed,
        "codec": header.codec,
        "header_length": header.header_length,
        "disk_id": str(uuid.UUID(bytes=header.disk_id)),
        "session_salt": header.salt.hex(),
        "seq": header.seq,
        "offset": header.offset,
        "length": header.length,
        "payload_length": header.payload_length,
        "frame_size": frame_size(header),
    }


def _inspect(args: argparse.Namespace) -> int:
    buf = memoryview(_read(args.file))
    decoder = FrameDecoder(load_secret(args.secret_file)) if args.secret_file else None
    records = []
    pos = 0
    while pos == 0 or pos < len(buf):
        header = peek_header(buf[pos:])
        size = frame_size(header)
        header.validate(len(buf) - pos)
        record = _header_record(header, pos)
        if decoder is not None:
            decoded = decoder.decode(buf[pos : pos + size])
            record.update(verified=True, plaintext_length=len(decoded.data), digest_ok=True)
        if args.json:
            records.append(record)
        else:
            if pos:
                print()
            _print_record(record)
        pos += size
    if args.json:
        print(json.dumps({"file": str(args.file), "frames": records}, indent=2))
    return 0


def _print_record(r: dict[str, Any]) -> None:
    kind = "compressed (zstd)" if r["compressed"] else "raw"
    lines = [
        f"frame at byte {r['position']}",
        f"  magic           {r['magic']}",
        f"  version         {r['version']}",
        f"  flags           0x{r['flags']:02x} ({'compressed' if r['compressed'] else 'raw'})",
        f"  codec           {r['codec']} (zstd + AES-256-GCM, HKDF-SHA256, XXH3-128)",
        f"  header length   {r['header_length']}",
        f"  disk id         {r['disk_id']}",
        f"  session salt    {r['session_salt']}",
        f"  seq             {r['seq']}",
        f"  offset          {r['offset']}",
        f"  length          {r['length']}",
        f"  payload length  {r['payload_length']}",
        f"  frame size      {r['frame_size']}",
    ]
    if r.get("verified"):
        ratio = r["length"] / (r["payload_length"] - 32)
        lines += [
            "  verified        authentication OK, digest OK (XXH3-128)",
            f"  plaintext       {r['plaintext_length']} bytes, {kind}, ratio {ratio:.2f}",
        ]
    else:
        lines.append("  verified        no (give --secret-file to decrypt and verify)")
    print("\n".join(lines))


def _encode(args: argparse.Namespace) -> int:
    disk_id = _hex_arg("--disk-id", args.disk_id, 16)
    salt = _hex_arg("--salt", args.salt, 16) if args.salt else None
    secret = load_secret(args.secret_file)
    data = _read(args.input)
    if not data:
        raise UsageError(f"{args.input} is empty: a frame carries at least one byte")
    block = args.block_size or len(data)
    if not 0 < block <= MAX_FRAME_LENGTH:
        raise UsageError(
            f"frame size {block} outside 1..{MAX_FRAME_LENGTH}",
            hint="use --block-size to split a large INPUT",
        )
    encoder = FrameEncoder(secret, disk_id, level=args.level, salt=salt)
    view = memoryview(data)
    frames = [
        encoder.encode(args.seq + i, args.offset + start, view[start : start + block])
        for i, start in enumerate(range(0, len(data), block))
    ]
    try:
        with open(args.output, "wb") as f:
            for frame in frames:
                f.write(frame)
    except OSError as err:
        raise UsageError(f"cannot write {args.output}: {err.strerror or err}") from err
    total = sum(len(f) for f in frames)
    summary = {
        "output": str(args.output),
        "frames": len(frames),
        "input_bytes": len(data),
        "output_bytes": total,
        "session_salt": encoder.session_salt.hex(),
        "last_seq": encoder.last_seq,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {len(frames)} frame(s), {len(data)} -> {total} bytes, to {args.output} "
            f"(seq {args.seq}..{encoder.last_seq})"
        )
    return 0
