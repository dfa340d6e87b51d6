"""Volumes of the master target: names, where their disks live, and creating new ones.

A *volume* is a named disk the master target owns and is the only writer of. Names
come from the network (``SessionId.volume``, ``CreateVolumeRequest.name``), so they
are untrusted: :func:`validate_volume_name` admits ``[A-Za-z0-9._-]{1,64}`` except
``.`` and ``..``, which can never be a path separator or a traversal.

Two kinds of volumes:

* **registered**: configured by the operator (``name -> path``), anywhere on the
  host (a block device, an existing VMDK) or an Azure page blob (``pageblob+URL``, a
  fixed VHD: docs/pageblob.md). The registry never creates or moves them.
* **created**: made by :meth:`VolumeRegistry.create` as ``<datastore>/<name>/<name>.vmdk``
  and recorded in ``<datastore>/volumes.json`` so a restart knows them. The manifest
  stores names, never paths: a created volume's path is always derived from the
  datastore, and checked with ``realpath`` so a symlink planted in the datastore
  cannot redirect writes outside it.

A volume can be **released** (:meth:`VolumeRegistry.release`): the master target
stops owning it so another writer may have its disk (failover hands the recovered
VMDKs over to the VMs). Releases are recorded in ``<state dir>/released-volumes.json``
as ``name -> path``, so a restart with the same configuration does not take the disk
back; registering the name at another path, or :meth:`~VolumeRegistry.create` with
the same name and size, does. The disk itself is never touched.

:func:`volume_disk_id` gives the 16-byte disk id that frames for a volume carry; the
source agent uses the same function, so a frame sealed for one volume can never be
applied to another (the id is authenticated by the frame's AEAD).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .disks import create_disk, open_disk
from .disks.base import io_error
from .disks.pageblob import is_pageblob_spec, parse_spec
from .durable import fsync_dir, write_atomically
from .errors import (
    ConfigError,
    InvalidVolumeNameError,
    ReplicationError,
    UnknownVolumeError,
    VolumeExistsError,
)
from .frame import DISK_ID_SIZE

__all__ = [
    "MANIFEST_NAME",
    "RELEASED_NAME",
    "VolumeInfo",
    "VolumeRegistry",
    "validate_volume_name",
    "volume_disk_id",
]

#: File in the datastore that lists the volumes created there.
MANIFEST_NAME = "volumes.json"
MANIFEST_VERSION = 1
#: File in the master target's state directory that lists the volumes it released.
RELEASED_NAME = "released-volumes.json"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DISK_ID_DOMAIN = b"replication volume\0"


def validate_volume_name(name: object) -> str:
    """Return ``name`` if it is a valid volume name, else raise InvalidVolumeNameError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidVolumeNameError(
            f"invalid volume name {name!r}",
            hint="use 1 to 64 characters of A-Z a-z 0-9 . _ - (not '.' or '..')",
        )
    return name


def volume_disk_id(name: str) -> bytes:
    """Return the 16-byte frame disk id of volume ``name`` (same on source and target)."""
    validate_volume_name(name)
    return hashlib.sha256(_DISK_ID_DOMAIN + name.encode()).digest()[:DISK_ID_SIZE]


@dataclass(frozen=True)
class VolumeInfo:
    """What ``ListVolumes`` reports about one volume."""

    name: str
    path: str
    size: int
    format: str
    subformat: str
    created: bool  # True: made by create() in the datastore; False: registered by config
    problem: str | None = None  # set by list() when the disk cannot be opened


@dataclass(frozen=True)
class _Created:
    """A manifest entry: what create() was asked for."""

    size: int
    subformat: str


class VolumeRegistry:
    """Resolve volume names to disks; create new VMDK volumes in the datastore."""

    def __init__(
        self,
        registered: Mapping[str, str | os.PathLike[str]],
        datastore: str | os.PathLike[str] | None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._registered = {
            validate_volume_name(name): _registered_path(name, path)
            for name, path in registered.items()
        }
        self._datastore = None if datastore is None else Path(datastore)
        self._created = self._load_manifest()
        self._state_dir = None if state_dir is None else Path(state_dir)
        self._released = self._load_released()  # name -> its path when released
        both = sorted(set(self._registered) & set(self._created))
        if both:
            raise ConfigError(
                f"volumes {both} are both registered and created in the datastore",
                hint="remove them from the configuration or from the datastore manifest",
            )

    # -- lookups --------------------------------------------------------------------

    def names(self) -> list[str]:
        """Return every volume name, sorted (released ones are no longer volumes)."""
        return sorted(n for n in {*self._registered, *self._created} if not self._is_released(n))

    def path(self, name: str) -> str:
        """Return the disk path of volume ``name`` without opening it."""
        validate_volume_name(name)
        if self._is_released(name):
            raise UnknownVolumeError(
                f"volume {name!r} was released: this master target no longer owns its disk",
                hint="CreateVolume with its name and size takes it back",
            )
        return self._known_path(name)

    def _known_path(self, name: str) -> str:
        """The disk path of a registered or created volume, released or not."""
        if name in self._registered:
            return self._registered[name]
        if name in self._created:
            return self._datastore_path(name)
        raise UnknownVolumeError(f"no volume named {name!r}", hint="see ListVolumes")

    def get(self, name: str) -> VolumeInfo:
        """Return the volume's info, reading size and format from its disk."""
        path = self.path(name)
        with open_disk(path) as disk:
            info = disk.info()
        return VolumeInfo(
            name=name,
            path=path,
            size=info.virtual_size,
            format=info.format,
            subformat=info.subformat,
            created=name in self._created,
        )

    def list(self) -> list[VolumeInfo]:
        """Return every volume; one that cannot be opened carries a ``problem``."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except ReplicationError as err:
                # One broken volume must not hide the others from the operator.
                out.append(self._broken_info(name, err))
        return out

    def _broken_info(self, name: str, err: ReplicationError) -> VolumeInfo:
        entry = self._created.get(name)
        return VolumeInfo(
            name=name,
            path=self.path(name),
            size=entry.size if entry else 0,
            format="vmdk" if entry else "",
            subformat=entry.subformat if entry else "",
            created=entry is not None,
            problem=f"{err.code}: {err.message}",
        )

    # -- creation -------------------------------------------------------------------

    def create(self, name: str, size: int, subformat: str = "monolithicSparse") -> VolumeInfo:
        """Create volume ``name`` as a new VMDK in the datastore; idempotent for one size.

        Raises VolumeExistsError if the name exists with another size or subformat,
        ConfigError if there is no datastore.
        """
        validate_volume_name(name)
        if self._is_released(name):
            return self._take_back(name, size, subformat)
        if name in self._registered or name in self._created:
            return self._existing(name, size, subformat)
        path = self._datastore_path(name)  # also refuses when there is no datastore
        if os.path.lexists(path):
            # A crash between create_disk and the manifest write leaves an unlisted disk.
            self._adopt(name, path, size, subformat)
        else:
            _make_dir(os.path.dirname(path))
            create_disk(path, size, format="vmdk", subformat=subformat).close()
        self._created[name] = _Created(size, subformat)
        try:
            self._save_manifest()
        except BaseException:
            # Not durable: forget it; a retry adopts the disk left behind.
            del self._created[name]
            raise
        return self.get(name)

    def _existing(self, name: str, size: int, subformat: str) -> VolumeInfo:
        info = self.get(name)
        if info.size != size:
            raise VolumeExistsError(
                f"volume {name!r} exists with size {info.size}, not {size}",
                hint="choose another name or ask for the existing size",
            )
        entry = self._created.get(name)
        if entry is not None and entry.subformat != subformat:
            raise VolumeExistsError(f"volume {name!r} exists as {entry.subformat}, not {subformat}")
        return info

    def _adopt(self, name: str, path: str, size: int, subformat: str) -> None:
        """Take over a disk left unlisted by a crash, if it is exactly what was asked."""
        with open_disk(path) as disk:
            info = disk.info()
        if info.format != "vmdk" or info.virtual_size != size or info.subformat != subformat:
            raise VolumeExistsError(
                f"{path} exists but is not in the manifest and is a {info.format} "
                f"{info.subformat} of {info.virtual_size} bytes",
                hint="remove the file if it is left over, or choose another name",
            )

    def _datastore_path(self, name: str) -> str:
        """Return ``<datastore>/<name>/<name>.vmdk``, refusing anything that resolves elsewhere.

        One directory per volume: the extent files of split subformats
        (``<name>-s001.vmdk``) can never collide with another volume's files.
        """
        if self._datastore is None:
            raise ConfigError(
                "this master target has no datastore to create volumes in",
                hint="start it with a datastore directory",
            )
        root = os.path.realpath(self._datastore)
        name = validate_volume_name(name)
        path = os.path.join(root, name, f"{name}.vmdk")
        # The name alone cannot escape (validated), but a symlink planted in the
        # datastore could: the resolved path must be exactly the expected one.
        real = os.path.realpath(path)
        if real != path:
            raise InvalidVolumeNameError(
                f"volume {name!r} resolves to {real}, not {path} in the datastore"
            )
        return path

    # -- release --------------------------------------------------------------------

    def release(self, name: str) -> VolumeInfo:
        """Stop owning volume ``name``, durably; idempotent. Return what it was.

        Only the registry's record changes: the caller (the applier) has closed every
        handle first. Raises UnknownVolumeError for a name never known.
        """
        validate_volume_name(name)
        if self._is_released(name):
            return self._describe(name, self._released[name])
        info = self._describe(name, self.path(name))
        self._released[name] = info.path
        try:
            self._save_released()
        except BaseException:
            del self._released[name]  # not durable: still ours
            raise
        return info

    def _is_released(self, name: str) -> bool:
        # a registration at another path is another disk: not the one released
        path = self._released.get(name)
        known = name in self._registered or name in self._created
        return path is not None and known and path == self._known_path(name)

    def _take_back(self, name: str, size: int, subformat: str) -> VolumeInfo:
        """CreateVolume of a released name: own its disk again if it is what is asked."""
        path = self._released.pop(name)
        try:
            info = self._existing(name, size, subformat)
            self._save_released()
        except BaseException:
            self._released[name] = path
            raise
        return info

    def _describe(self, name: str, path: str) -> VolumeInfo:
        """The volume's info, or a broken one if its disk cannot be opened."""
        try:
            with open_disk(path) as disk:
                d = disk.info()
        except ReplicationError as err:
            return VolumeInfo(name, path, 0, "", "", name in self._created, f"{err.code}: {err}")
        return VolumeInfo(name, path, d.virtual_size, d.format, d.subformat, name in self._created)

    def _released_path(self) -> Path:
        if self._state_dir is None:
            raise ConfigError(
                "this registry has no state directory to record released volumes in",
                hint="give the master target a --data-dir",
            )
        return self._state_dir / RELEASED_NAME

    def _load_released(self) -> dict[str, str]:
        if self._state_dir is None or not (self._state_dir / RELEASED_NAME).exists():
            return {}
        path = self._state_dir / RELEASED_NAME
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            return {validate_volume_name(n): str(p) for n, p in doc["released"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"released volumes {path} are unreadable: {err}") from err
        except InvalidVolumeNameError as err:
            raise ConfigError(f"released volumes {path}: {err}") from err

    def _save_released(self) -> None:
        """Write the released list durably (temporary file, fsync, rename, fsync dir)."""
        path = self._released_path()
        doc = {"version": MANIFEST_VERSION, "released": dict(sorted(self._released.items()))}
        try:
            write_atomically(path, json.dumps(doc, indent=1).encode())
        except OSError as err:
            raise io_error(f"write released volumes {path}", err) from err

    # -- manifest -------------------------------------------------------------------

    def _manifest_path(self) -> Path | None:
        return None if self._datastore is None else self._datastore / MANIFEST_NAME

    def _load_manifest(self) -> dict[str, _Created]:
        path = self._manifest_path()
        if path is None or not path.exists():
            return {}
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            return {
                validate_volume_name(name): _Created(int(v["size"]), str(v["subformat"]))
                for name, v in doc["volumes"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"volume manifest {path} is unreadable: {err}") from err
        except InvalidVolumeNameError as err:
            raise ConfigError(f"volume manifest {path}: {err}") from err

    def _save_manifest(self) -> None:
        """Write the manifest durably: temporary file, fsync, rename, fsync directory."""
        path = self._manifest_path()
        assert path is not None  # create() resolved a datastore path first
        doc = {
            "version": MANIFEST_VERSION,
            "volumes": {
                name: {"size": e.size, "subformat": e.subformat}
                for name, e in sorted(self._created.items())
            },
        }
        try:
            write_atomically(path, json.dumps(doc, indent=1, sort_keys=True).encode())
        except OSError as err:
            raise io_error(f"write volume manifest {path}", err) from err


def _registered_path(name: str, path: str | os.PathLike[str]) -> str:
    """A registered volume's path; a page blob spec is checked here, before any network.

    A blob volume (``pageblob+URL`` or ``pageblob:CONTAINER/BLOB``, see docs/pageblob.md)
    is opened like a file; only its history stays local, under the data directory.
    """
    path = os.fspath(path)
    if is_pageblob_spec(path):
        spec = parse_spec(path)  # UsageError for a malformed spec
        if spec.snapshot:
            raise ConfigError(
                f"volume {name!r}: {spec.display} is a blob snapshot, which cannot be written",
                hint="register the base blob (without ?snapshot=) as the volume",
            )
    return path


def _make_dir(path: str) -> None:
    """Create a volume's directory durably (its entry in the datastore is fsynced)."""
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        fsync_dir(os.path.dirname(path))
    except OSError as err:
        raise io_error(f"create volume directory {path}", err) from err
