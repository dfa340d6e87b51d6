"""The replication protocol's domain side: versions, features and messages (sans-I/O).

Version negotiation happens once per connection (``Handshake``): both peers send
their ``[protocol_min, protocol_max]`` range and a feature bitmask; the agreed
version is the highest common one and the agreed features the intersection.
Code then asks ``agreed.has(Feature.HASHMAP_RESYNC)``; it never compares version
numbers (rule taken from DRBD: one place decides, everyone else checks by name).

Accepted ranges: v1 only (this is the first protocol). A peer whose range does not
include 1 is refused with :class:`ProtocolVersionError`.

The message dataclasses below are what agents and the library exchange;
``replication.wire`` converts them to and from protobuf at the gRPC boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ProtocolVersionError

__all__ = [
    "PROTOCOL_MAX",
    "PROTOCOL_MIN",
    "REQUIRED_BY_SOURCE",
    "SUPPORTED_FEATURES",
    "AckLevel",
    "Agreed",
    "Feature",
    "Hello",
    "negotiate",
]

PROTOCOL_MIN = 1
PROTOCOL_MAX = 1


class Feature(enum.IntFlag):
    """Optional capabilities, one bit each; values match ``replication.v1.Feature``."""

    #: frames may be zstd-compressed (frame flag COMPRESSED); always set in v1
    ZSTD = 1
    #: the target streams its hash map so the source sends only differing blocks
    HASHMAP_RESYNC = 2
    #: the process server acknowledges RECEIVED (spooled and fsynced) before PERSISTED
    RECEIVED_ACK = 4
    #: sessions may end with an epoch-end marker frame (frame flag MARKER), which a
    #: master target records and never writes
    EPOCH_MARKERS = 8
    #: frames carry the session's order number in their authenticated salt (frame flag
    #: ORDERED); a master target refuses a session older than the newest of its volume
    SESSION_ORDER = 16
    #: PERSISTED acks and session states carry the master target's MAC; the process
    #: server relays it unchanged (it cannot make one)
    ACK_MAC = 32


#: every feature this build implements
SUPPORTED_FEATURES = (
    Feature.ZSTD
    | Feature.HASHMAP_RESYNC
    | Feature.RECEIVED_ACK
    | Feature.EPOCH_MARKERS
    | Feature.SESSION_ORDER
    | Feature.ACK_MAC
)
#: what a source requires of its process server: both close a hole the process server
#: itself could exploit, so a relay that leaves them out (an old build, or one
#: downgrading on purpose) is refused rather than trusted as before
REQUIRED_BY_SOURCE = Feature.SESSION_ORDER | Feature.ACK_MAC


class AckLevel(enum.IntEnum):
    """Durability named by an acknowledgement (values match the proto enum)."""

    RECEIVED = 1  # in the process server's spool, fsynced
    PERSISTED = 2  # applied at the master target, volume and apply state fsynced


@dataclass(frozen=True)
class Hello:
    """What a peer says about itself at the start of a connection."""

    protocol_min: int = PROTOCOL_MIN
    protocol_max: int = PROTOCOL_MAX
    features: int = int(SUPPORTED_FEATURES)
    agent_version: str = "replication 0.1.0"
    role: str = ""


@dataclass(frozen=True)
class Agreed:
    """The outcome of a negotiation: one version and a feature set."""

    version: int
    features: Feature

    def has(self, feature: Feature) -> bool:
        """Return whether both peers support ``feature``."""
        return bool(self.features & feature)

    def require(self, features: Feature, peer: str) -> None:
        """Raise ProtocolVersionError unless both peers support every one of ``features``."""
        missing = [f.name for f in Feature if f & features and not f & self.features]
        if missing:
            raise ProtocolVersionError(
                f"the {peer} does not offer {', '.join(missing)}, which this agent requires",
                hint=f"upgrade the {peer} (and its master target first)",
            )


def negotiate(local: Hello, remote: Hello) -> Agreed:
    """Return the agreed version and features, or raise ProtocolVersionError."""
    low = max(local.protocol_min, remote.protocol_min)
    high = min(local.protocol_max, remote.protocol_max)
    if low > high:
        raise ProtocolVersionError(
            f"no common protocol version: we speak {local.protocol_min}..{local.protocol_max}, "
            f"the peer {remote.protocol_min}..{remote.protocol_max}",
            hint="upgrade the older agent",
        )
    return Agreed(version=high, features=Feature(local.features & remote.features))
