"""NBD wire constants: magics, handshake and transmission flags, options, commands, errors.

Every field on the wire is big-endian ("network byte order"); the layouts live in
``docs/nbd.md`` and in the struct formats of :mod:`.protocol`. The values are the
ones of the upstream specification (NetworkBlockDevice/nbd ``doc/proto.md``); none of
them is ours to change.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "CLIENT_FLAGS_KNOWN",
    "CMD_FLAG_DF",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "FLAG_CAN_MULTI_CONN",
    "FLAG_C_FIXED_NEWSTYLE",
    "FLAG_C_NO_ZEROES",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_HAS_FLAGS",
    "FLAG_NO_ZEROES",
    "FLAG_READ_ONLY",
    "FLAG_SEND_DF",
    "FLAG_SEND_FLUSH",
    "FLAG_SEND_FUA",
    "FLAG_SEND_TRIM",
    "FLAG_SEND_WRITE_ZEROES",
    "IHAVEOPT",
    "INFO_BLOCK_SIZE",
    "INFO_DESCRIPTION",
    "INFO_EXPORT",
    "INFO_NAME",
    "MAX_STRING",
    "NBDMAGIC",
    "OPTION_REPLY_MAGIC",
    "REPLY_FLAG_DONE",
    "REPLY_TYPE_ERROR",
    "REPLY_TYPE_ERROR_OFFSET",
    "REPLY_TYPE_NONE",
    "REPLY_TYPE_OFFSET_DATA",
    "REPLY_TYPE_OFFSET_HOLE",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "Command",
    "Errno",
    "Option",
    "Rep",
]

# --- magics -----------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option header
OPTION_REPLY_MAGIC = 0x0003E889045565A9  # every fixed-newstyle option reply
REQUEST_MAGIC = 0x25609513  # every transmission request
SIMPLE_REPLY_MAGIC = 0x67446698  # simple (unstructured) reply
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # one structured reply chunk

#: longest export name or message the spec allows (a string SHOULD be <= 256 bytes)
MAX_STRING = 4096

# --- handshake flags (16 bits, server) and client flags (32 bits) --------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1  # we may omit the 124 zero bytes after NBD_OPT_EXPORT_NAME
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
#: a client flag outside this set ends the connection (the spec says MUST)
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (16 bits, per export) -------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7  # only with structured replies: READ may ask for one content chunk
# Every connection to an export shares one Disk object and one lock, and flush() makes
# every completed write durable: the condition the spec puts on this flag.
FLAG_CAN_MULTI_CONN = 1 << 8

# --- command flags (16 bits, per request) -----------------------------------------------------

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3  # BLOCK_STATUS only; we do not offer it
CMD_FLAG_FAST_ZERO = 1 << 4  # not advertised: a request carrying it gets EINVAL

# --- structured replies -------------------------------------------------------------------------

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- NBD_REP_INFO types ---------------------------------------------------------------------------

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3


class Option(IntEnum):
    """Option haggling requests (``NBD_OPT_*``)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    """Option reply types (``NBD_REP_*``); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Command(IntEnum):
    """Transmission request types (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class Errno(IntEnum):
    """Error values of replies: the spec's fixed numbers, not the host's errno."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108
