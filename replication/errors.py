"""One error hierarchy for the whole engine.

Every error raised on purpose is a :class:`ReplicationError`. Each class has:

* ``code``: a stable dotted string (``disk.corrupt_header``). Codes are part of the
  public contract: logs, the CLI's ``--json`` output and (later) gRPC error details
  carry them. A code is never reused for another meaning.
* ``exit_status``: what the CLI exits with when this error ends a command.
* ``retryable``: whether trying the same operation again may succeed.
* the class docstring: one line saying what happened, used to generate
  ``docs/errors.md``.

Classes are split by *what the caller should do*: fix the input (format and range
errors), fix the environment (snapshots, disk full), or retry (transient I/O).
Always chain the cause: ``raise DiskIOError("read extent: ...") from err``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ERRORS_BY_CODE",
    "CertificateError",
    "ChecksumMismatch",
    "ConfigError",
    "CorruptHeaderError",
    "DiskError",
    "DiskFullError",
    "DiskHasSnapshotsError",
    "DiskIOError",
    "DiskReadOnlyError",
    "DiskSizeMismatchError",
    "FrameAuthError",
    "FrameError",
    "FrameFormatError",
    "FrameGapError",
    "FrameReplayError",
    "FrameSequenceError",
    "FrameTruncatedError",
    "HashMapFormatError",
    "InvalidVolumeNameError",
    "LocalProtocolError",
    "OutOfRangeError",
    "PairBusyError",
    "PairFailedError",
    "PeerRoleError",
    "ProtocolError",
    "ProtocolVersionError",
    "RemoteProtocolError",
    "ReplicationError",
    "SessionNotOpenError",
    "SpoolBusyError",
    "SpoolCorruptError",
    "SpoolDiskFullError",
    "SpoolError",
    "SpoolFullError",
    "UnknownDiskError",
    "UnknownVolumeError",
    "UnsupportedFormatError",
    "UsageError",
    "VolumeError",
    "VolumeExistsError",
    "render_error_table",
]

#: code -> class, filled in as classes are defined; one registry for every boundary.
ERRORS_BY_CODE: dict[str, type[ReplicationError]] = {}


class ReplicationError(Exception):
    """An error of the replication engine."""

    code: ClassVar[str] = "replication.error"
    exit_status: ClassVar[int] = 1
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code in ERRORS_BY_CODE:
            raise TypeError(f"error code {cls.code!r} is already used")
        ERRORS_BY_CODE[cls.code] = cls

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        """Return the error as a JSON-friendly record (code, message, hint)."""
        return {"code": self.code, "message": self.message, "hint": self.hint}


ERRORS_BY_CODE[ReplicationError.code] = ReplicationError


class UsageError(ReplicationError):
    """The command line or API call was malformed."""

    code = "usage.invalid"
    exit_status = 2


class ConfigError(ReplicationError):
    """A configuration value is missing or invalid."""

    code = "config.invalid"
    exit_status = 2


# --- disks -----------------------------------------------------------------


class DiskError(ReplicationError):
    """A disk image or device could not be used."""

    code = "disk.error"
    exit_status = 3


class UnsupportedFormatError(DiskError):
    """The disk's format or subformat is not supported for this operation."""

    code = "disk.unsupported_format"


class CorruptHeaderError(DiskError):
    """A disk header, footer, descriptor or table is corrupt or hostile."""

    code = "disk.corrupt_header"


class DiskReadOnlyError(DiskError):
    """The disk was opened read-only or its format cannot be written."""

    code = "disk.read_only"


class DiskHasSnapshotsError(DiskError):
    """The disk belongs to a snapshot chain; writing it would corrupt the chain."""

    code = "disk.has_snapshots"
    exit_status = 4


class OutOfRangeError(DiskError):
    """An offset or length lies outside the disk."""

    code = "disk.out_of_range"


class DiskSizeMismatchError(DiskError):
    """The target disk is smaller than the source disk."""

    code = "disk.size_mismatch"


class DiskIOError(DiskError):
    """The operating system failed a read, write or flush."""

    code = "disk.io"
    retryable = True


class DiskFullError(DiskIOError):
    """No space is left on the device that holds the disk."""

    code = "disk.full"
    retryable = False


# --- block pipeline -------------------------------------------------------------


class HashMapFormatError(ReplicationError):
    """A hash map file is corrupt, truncated or of another version."""

    code = "hashmap.format"
    exit_status = 3


class FrameError(ReplicationError):
    """A block frame could not be decoded."""

    code = "frame.error"
    exit_status = 5


class FrameFormatError(FrameError):
    """A frame has a bad magic, version, codec or field value."""

    code = "frame.format"


class FrameTruncatedError(FrameError):
    """A frame is shorter than its header says."""

    code = "frame.truncated"


class FrameAuthError(FrameError):
    """A frame failed authentication: tampered, bound to other metadata, or wrong key."""

    code = "frame.auth"


class ChecksumMismatch(FrameError):
    """The plaintext of a frame does not match its XXH3-128 digest."""

    code = "frame.checksum"


class FrameSequenceError(FrameError):
    """A frame's sequence number was reused or went backwards."""

    code = "frame.sequence"


# --- certificates and transport security ------------------------------------------


class CertificateError(ReplicationError):
    """A certificate, key or CA file is missing, unreadable, invalid or does not match."""

    code = "tls.certificate"
    exit_status = 6


class PeerRoleError(ReplicationError):
    """The peer's certificate carries no role, or a role not allowed for this call."""

    code = "tls.peer_role"
    exit_status = 6


# --- protocol -----------------------------------------------------------------------


class ProtocolError(ReplicationError):
    """A peer broke the replication protocol."""

    code = "protocol.error"
    exit_status = 6


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug on this side)."""

    code = "protocol.local"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""

    code = "protocol.remote"


class ProtocolVersionError(ProtocolError):
    """The peers share no protocol version."""

    code = "protocol.version"


# --- volumes and apply sessions (master target) -------------------------------------


class FrameGapError(FrameSequenceError):
    """A frame's sequence number skipped ahead of the next one expected."""

    code = "frame.gap"


class FrameReplayError(FrameSequenceError):
    """A frame reuses a (volume, session, seq) already accepted with other content."""

    code = "frame.replay"


class SessionNotOpenError(ReplicationError):
    """A frame or request names a session that was not opened on this master target."""

    code = "session.not_open"
    exit_status = 7


class VolumeError(ReplicationError):
    """A volume of the master target could not be used."""

    code = "volume.error"
    exit_status = 7


class InvalidVolumeNameError(VolumeError):
    """A volume name is empty, too long, or has characters other than [A-Za-z0-9._-]."""

    code = "volume.invalid_name"
    exit_status = 2


class UnknownVolumeError(VolumeError):
    """No volume of that name is registered on the master target."""

    code = "volume.unknown"


class VolumeExistsError(VolumeError):
    """A volume of that name already exists with another size or format."""

    code = "volume.exists"


# --- process server spool ---------------------------------------------------------


class SpoolError(ReplicationError):
    """The process server's spool could not be used."""

    code = "spool.error"
    exit_status = 8


class SpoolFullError(SpoolError):
    """The spool reached its byte limit; retry once forwarded frames are persisted."""

    code = "spool.full"
    retryable = True


class SpoolDiskFullError(SpoolFullError):
    """The device holding the spool is full; unsynced appends were rolled back."""

    code = "spool.disk_full"


class SpoolCorruptError(SpoolError):
    """A spool segment or cursor file is corrupt before its tail (file and offset named)."""

    code = "spool.corrupt"


class SpoolBusyError(SpoolError):
    """Another process holds the spool directory's lock."""

    code = "spool.busy"


class PairFailedError(ReplicationError):
    """A replication pair could not finish: a peer refused it or the deadline passed."""

    code = "pair.failed"
    exit_status = 7


class UnknownDiskError(ReplicationError):
    """The source agent has no disk of that name (its ``--disk NAME=PATH`` list)."""

    code = "pair.unknown_disk"


class PairBusyError(ReplicationError):
    """The disk already replicates to another volume; stop that pair first."""

    code = "pair.busy"


def render_error_table() -> str:
    """Return ``docs/errors.md``: every error code with its class, exit status and meaning."""
    lines = [
        "# Error codes",
        "",
        "Generated from `replication/errors.py` by `make docs`; do not edit by hand.",
        "",
        "| code | class | exit status | retryable | meaning |",
        "|---|---|---|---|---|",
    ]
    for code, cls in sorted(ERRORS_BY_CODE.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines.append(
            f"| `{code}` | `{cls.__name__}` | {cls.exit_status} | "
            f"{'yes' if cls.retryable else 'no'} | {doc} |"
        )
    return "\n".join(lines) + "\n"


# --- NBD front end (source agent) ---------------------------------------------------


class NbdProtocolError(RemoteProtocolError):
    """An NBD client broke the NBD protocol: bad magic, unknown flag or truncated message."""

    code = "nbd.protocol"


__all__ += ["NbdProtocolError"]


# --- retention journal and recovery-point manifests (master target) ---------------


class JournalError(ReplicationError):
    """The retention journal of a volume could not be used."""

    code = "journal.error"
    exit_status = 9


class JournalCorruptError(JournalError):
    """A journal segment is corrupt before its tail (file and offset named)."""

    code = "journal.corrupt"


class JournalBusyError(JournalError):
    """Another process holds the journal directory's lock."""

    code = "journal.busy"


class JournalDiskFullError(JournalError):
    """The device holding the journal is full; prune it or make room, then retry."""

    code = "journal.disk_full"
    retryable = True


class PointNotFoundError(JournalError):
    """No recovery point of the journal matches the request."""

    code = "journal.point_not_found"


class ManifestError(ReplicationError):
    """A recovery-point manifest store could not be used."""

    code = "manifest.error"
    exit_status = 9


class ManifestCorruptError(ManifestError):
    """A manifest object is corrupt, or its content does not hash to its root."""

    code = "manifest.corrupt"


class ManifestNotFoundError(ManifestError):
    """No manifest with that root is in the store."""

    code = "manifest.not_found"


__all__ += [
    "JournalBusyError",
    "JournalCorruptError",
    "JournalDiskFullError",
    "JournalError",
    "ManifestCorruptError",
    "ManifestError",
    "ManifestNotFoundError",
    "PointNotFoundError",
]


# --- master target volumes under pressure -----------------------------------------


class VolumeDiskFullError(DiskFullError):
    """The device holding a master target volume or its apply state is full; retry later."""

    code = "volume.disk_full"
    exit_status = 7
    retryable = True


__all__ += ["VolumeDiskFullError"]


# --- changed-block tracking (source agent) ------------------------------------------


class TrackingError(ReplicationError):
    """The changed-block tracking state of a disk could not be used."""

    code = "tracking.error"
    exit_status = 10


class TrackingBusyError(TrackingError):
    """Another process holds the tracking state's lock."""

    code = "tracking.busy"


class TrackingBrokenError(TrackingError):
    """Writing or fsyncing the tracking state failed; writes are refused until reopened."""

    code = "tracking.broken"


class EpochError(TrackingError):
    """An epoch was begun while another is in flight, or ended twice (a caller bug)."""

    code = "tracking.epoch"


__all__ += ["EpochError", "TrackingBrokenError", "TrackingBusyError", "TrackingError"]


# --- recovery history (master target) ---------------------------------------------


class VerifyMismatchError(ReplicationError):
    """A disk differs from the recovery point it was checked against (ranges named)."""

    code = "verify.mismatch"
    exit_status = 1


__all__ += ["VerifyMismatchError"]


class TagFailedError(ReplicationError):
    """A tagged cut could not be made (disk not tracked or not protected, hook failed, timeout)."""

    code = "pair.tag_failed"
    retryable = True


__all__ += ["TagFailedError"]


# --- orchestrator and its configuration store ---------------------------------------


class OrchestratorError(ReplicationError):
    """A failback step could not run; nothing was moved unless the message says so."""

    code = "orchestrator.error"
    exit_status = 11


class UnknownVmError(OrchestratorError):
    """The VM is not in the configuration store: register it first (failback fails otherwise)."""

    code = "orchestrator.unknown_vm"


class UnknownObjectError(OrchestratorError):
    """No server, disk, group, plan or job of that name is in the configuration store."""

    code = "orchestrator.unknown"


class DuplicateDiskUuidError(OrchestratorError):
    """Two registered disks share one UUID; give one a new UUID before protecting them."""

    code = "orchestrator.duplicate_uuid"


class ServerUnreachableError(OrchestratorError):
    """A process server, master target or source agent did not answer its control service."""

    code = "orchestrator.unreachable"
    retryable = True


class ServerIdentityError(OrchestratorError):
    """A server's certificate is not the one registered in the configuration store."""

    code = "orchestrator.fingerprint"


class DatastoreNotWritableError(OrchestratorError):
    """The master target cannot create a disk in its datastore (a read-only account's symptom)."""

    code = "orchestrator.datastore_read_only"


class OriginalDiskMissingError(OrchestratorError):
    """The original VMDK is not registered, or not readable, on the chosen master target."""

    code = "orchestrator.original_missing"


class PhysicalTargetError(OrchestratorError):
    """Failing back onto a physical machine is not supported; recover it to a new VMDK."""

    code = "orchestrator.physical_target"


class WrongStateError(OrchestratorError):
    """The step does not apply to the VM's current phase (e.g. failover before reprotect)."""

    code = "orchestrator.wrong_state"


class JobBusyError(OrchestratorError):
    """Another running orchestrator job already works on one of these VMs."""

    code = "orchestrator.busy"
    retryable = True


class StoreError(ReplicationError):
    """The orchestrator's configuration store could not be used."""

    code = "store.error"
    exit_status = 12


class StoreVersionError(StoreError):
    """The configuration store was written by a newer version of the schema."""

    code = "store.version"


class StoreCorruptError(StoreError):
    """The configuration store or a backup of it is not a valid store (integrity check)."""

    code = "store.corrupt"


__all__ += [
    "DatastoreNotWritableError",
    "DuplicateDiskUuidError",
    "JobBusyError",
    "OrchestratorError",
    "OriginalDiskMissingError",
    "PhysicalTargetError",
    "ServerIdentityError",
    "ServerUnreachableError",
    "StoreCorruptError",
    "StoreError",
    "StoreVersionError",
    "UnknownObjectError",
    "UnknownVmError",
    "WrongStateError",
]


# --- handing a volume over (master target ReleaseVolume) --------------------------------


class VolumeInUseError(VolumeError):
    """A volume cannot be released: a data session on it is open or its frames are unapplied."""

    code = "volume.in_use"
    retryable = True


class VolumeHeldError(OrchestratorError):
    """A recovered VMDK is still a volume of a master target, which may write it."""

    code = "orchestrator.volume_held"


__all__ += ["VolumeHeldError", "VolumeInUseError"]


# --- reverse reprotect onto an Azure disk ------------------------------------------------


class AzureDiskMissingError(OrchestratorError):
    """The Azure-side master target lists the Azure disk's volume but cannot open it."""

    code = "orchestrator.azure_disk_missing"


__all__ += ["AzureDiskMissingError"]


# --- the process server's forwarding: liveness ------------------------------------------


class ForwardStalledError(ReplicationError):
    """The master target acknowledged nothing within the progress deadline while frames waited."""

    code = "relay.stalled"
    retryable = True


__all__ += ["ForwardStalledError"]


# --- data-path security: session ordering, authenticated acks, server roles -------------


class StaleSessionError(ProtocolError):
    """A session older than the newest one applied to its volume, or unordered on an ordered one."""

    code = "session.stale"


class ForgedAckError(ProtocolError):
    """An acknowledgement's MAC is wrong: the master target of this session did not make it."""

    code = "ack.forged"


class ServerRoleError(PeerRoleError):
    """The server did not prove the role the client dialled (certificate of another role)."""

    code = "tls.server_role"


__all__ += ["ForgedAckError", "ServerRoleError", "StaleSessionError"]


# --- memory bounds (hostile or huge disks) ----------------------------------------


class DiskTooLargeError(DiskError):
    """The disk is larger than this operation's configured memory bound allows."""

    code = "disk.too_large"


__all__ += ["DiskTooLargeError"]


# --- replication bench ---------------------------------------------------------------


class BenchStageFailedError(ReplicationError):
    """A benchmark stage failed (a result that fails its check, a step that could not run)."""

    code = "bench.stage_failed"


__all__ += ["BenchStageFailedError"]


# --- the process server's relay to the master target -----------------------------------


class RelayTargetError(PairFailedError):
    """The process server could not reach or talk to its master target for this call (retried)."""

    code = "relay.target_unreachable"
    retryable = True


__all__ += ["RelayTargetError"]


# --- the orchestrator's pair state table ----------------------------------------------


class PairStateError(WrongStateError):
    """A pair state change that the pair state table does not allow was refused."""

    code = "orchestrator.pair_state"


class FailoverInterruptedError(WrongStateError):
    """A failover stopped half way (some volumes already released): run failover again."""

    code = "orchestrator.failover_interrupted"


__all__ += ["FailoverInterruptedError", "PairStateError"]
