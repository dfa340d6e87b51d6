"""The configuration store: one SQLite database of everything the orchestrator knows.

The scenario's rule: a VM must be in the configuration server's database for its
failback to succeed, and that database must be backed up. So the store is the
orchestrator's only memory (VMs and disks, servers, groups, plans, pairs, jobs) and
``backup``/``restore`` are first-class.

Rules of the file (``<dir>/config.sqlite``):

* WAL mode, ``synchronous=FULL``: a committed change survives a power cut; readers
  never block the writer.
* Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a crash, a
  kill -9 or an error in the middle leaves the store as it was before the change.
* The schema is versioned in ``PRAGMA user_version``. :data:`MIGRATIONS` lists the
  scripts from version 1 on; opening applies the missing ones, each in the same
  transaction as the version bump. A store of a *newer* version is refused
  (:class:`~replication.errors.StoreVersionError`), never downgraded.
* A pair's state changes only as the pair state table allows
  (:mod:`.pairstates`): every write checks the stored state in its own
  transaction and refuses any other change (PairStateError), leaving the store as
  it was.
* :meth:`Store.backup` uses SQLite's online backup API: a consistent copy while
  other connections (another orchestrator process) write. :meth:`Store.restore`
  checks the file first (integrity, schema) and copies it in with the same API.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..durable import fsync_dir
from ..errors import (
    JobBusyError,
    StoreCorruptError,
    StoreError,
    StoreVersionError,
    UnknownObjectError,
    UnknownVmError,
)
from .model import Disk, Group, Job, Pair, Plan, Server, Vm
from .pairstates import FAIL_OVER, FAILED_OVER, START, check_change

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "STORE_FILE", "Store", "open_store"]

STORE_FILE = "config.sqlite"

#: schema scripts; MIGRATIONS[n] takes a store from version n to n + 1
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE servers (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('process-server', 'master-target')),
        address TEXT NOT NULL,
        site TEXT NOT NULL CHECK (site IN ('on-prem', 'azure')),
        fingerprint TEXT NOT NULL DEFAULT '',
        datastore TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('vmware-vm', 'physical')),
        azure_agent TEXT NOT NULL DEFAULT '',
        onprem_agent TEXT NOT NULL DEFAULT '',
        phase TEXT NOT NULL DEFAULT 'in-azure',
        location TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE disks (
        vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        uuid TEXT NOT NULL,
        size INTEGER NOT NULL CHECK (size > 0),
        original_vmdk TEXT NOT NULL DEFAULT '',
        original_volume TEXT NOT NULL DEFAULT '',
        azure_disk TEXT NOT NULL DEFAULT '',
        azure_path TEXT NOT NULL DEFAULT '',
        azure_volume TEXT NOT NULL DEFAULT '',
        onprem_disk TEXT NOT NULL DEFAULT '',
        recovered_volume TEXT NOT NULL DEFAULT '',
        recovered_path TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (vm, name)
    );
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        failback_of TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE group_vms (
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        PRIMARY KEY (grp, vm)
    );
    CREATE TABLE plans (name TEXT PRIMARY KEY);
    CREATE TABLE plan_groups (
        plan TEXT NOT NULL REFERENCES plans(name) ON DELETE CASCADE,
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        PRIMARY KEY (plan, grp)
    );
    CREATE TABLE pairs (
        vm TEXT NOT NULL,
        disk TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('failback', 'forward')),
        source_agent TEXT NOT NULL,
        source_disk TEXT NOT NULL,
        process_server TEXT NOT NULL,
        master_target TEXT NOT NULL,
        volume TEXT NOT NULL,
        location TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        point TEXT NOT NULL DEFAULT '',
        updated REAL NOT NULL,
        PRIMARY KEY (vm, disk, direction),
        FOREIGN KEY (vm, disk) REFERENCES disks(vm, name) ON DELETE CASCADE
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'interrupted')),
        progress REAL NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        error_code TEXT NOT NULL DEFAULT '',
        error_message TEXT NOT NULL DEFAULT '',
        result TEXT NOT NULL DEFAULT '{}',
        vms TEXT NOT NULL DEFAULT '[]',
        pid INTEGER NOT NULL DEFAULT 0,
        pid_start TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs(state);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_TABLES = {
    "servers",
    "vms",
    "disks",
    "groups",
    "group_vms",
    "plans",
    "plan_groups",
    "pairs",
    "jobs",
}


def open_store(directory: str | os.PathLike[str]) -> Store:
    """Open (creating if needed) the store in ``directory``; migrate it to this version."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the store directory {root}: {err}") from err
    return Store(root / STORE_FILE)


class Store:
    """The configuration store; every method is one transaction (thread: the caller's)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db = _connect(self.path)
        try:
            _migrate(self._db, self.path)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back if the block raises."""
        with _sqlite_errors(f"write {self.path}"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with _sqlite_errors(f"read {self.path}"):
            return self._db.execute(sql, tuple(args)).fetchall()

    # -- servers --------------------------------------------------------------------

    def put_server(self, server: Server) -> None:
        """Add or replace a server (same name: new address or fingerprint)."""
        with self.transaction() as db:
            _upsert(db, "servers", server, ("name",))

    def server(self, name: str) -> Server:
        rows = self._rows("SELECT * FROM servers WHERE name = ?", (name,))
        if not rows:
            raise UnknownObjectError(
                f"no server named {name!r} in the configuration store",
                hint="register it with `replication orchestrate register-server`",
            )
        return Server(**dict(rows[0]))

    def servers(self) -> list[Server]:
        return [Server(**dict(r)) for r in self._rows("SELECT * FROM servers ORDER BY name")]

    # -- VMs and disks --------------------------------------------------------------

    def put_vm(self, vm: Vm) -> None:
        """Add or update a VM (not its disks, phase or location if it exists)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO vms (name, kind, azure_agent, onprem_agent, phase, location) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET kind = "
                "excluded.kind, azure_agent = excluded.azure_agent, "
                "onprem_agent = excluded.onprem_agent",
                (vm.name, vm.kind, vm.azure_agent, vm.onprem_agent, vm.phase, vm.location),
            )

    def put_disk(self, disk: Disk) -> None:
        """Add or replace a disk of a registered VM."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM vms WHERE name = ?", (disk.vm,)).fetchone():
                raise _unknown_vm(disk.vm)
            _upsert(db, "disks", disk, ("vm", "name"))

    def vm(self, name: str) -> Vm:
        """Return the VM with its disks, or raise UnknownVmError."""
        rows = self._rows("SELECT * FROM vms WHERE name = ?", (name,))
        if not rows:
            raise _unknown_vm(name)
        disks = self._rows("SELECT * FROM disks WHERE vm = ? ORDER BY name", (name,))
        return Vm(**dict(rows[0]), disks=tuple(Disk(**dict(d)) for d in disks))

    def vms(self) -> list[Vm]:
        return [self.vm(r["name"]) for r in self._rows("SELECT name FROM vms ORDER BY name")]

    def disks(self) -> list[Disk]:
        """Every registered disk of every VM."""
        return [Disk(**dict(r)) for r in self._rows("SELECT * FROM disks ORDER BY vm, name")]

    def set_phase(self, vms: Iterable[str], phase: str, location: str | None = None) -> None:
        """Move VMs to ``phase`` (and record the failback location) in one transaction."""
        with self.transaction() as db:
            for name in vms:
                _set_phase(db, name, phase, location)

    def record_started(
        self,
        pairs: Iterable[Pair],
        phases: dict[str, tuple[str, str | None]],
        failback_groups: bool,
    ) -> None:
        """A step started its pairs: the pairs, the VMs' phases ``{vm: (phase, location)}``
        and, for reprotect, the move to the failback groups: one transaction."""
        with self.transaction() as db:
            for pair in pairs:
                _check_pair(db, pair.vm, pair.disk, pair.direction, START, pair.state)
                _upsert(db, "pairs", pair, ("vm", "disk", "direction"))
            for vm, (phase, location) in phases.items():
                _set_phase(db, vm, phase, location)
                if failback_groups:
                    _move_to_failback(db, vm)

    def record_failover(
        self, recovered: Iterable[tuple[str, str, str, str, str]], vms: Iterable[str], phase: str
    ) -> None:
        """Failover's end in one transaction: for each (vm, disk, volume, path, point)
        where the data is now, its failback pair ``failed-over``; then the VMs' phase."""
        now = time.time()
        with self.transaction() as db:
            for vm, disk, volume, path, point in recovered:
                db.execute(
                    "UPDATE disks SET recovered_volume = ?, recovered_path = ? "
                    "WHERE vm = ? AND name = ?",
                    (volume, path, vm, disk),
                )
                _check_pair(db, vm, disk, "failback", FAIL_OVER, FAILED_OVER)
                db.execute(
                    "UPDATE pairs SET state = ?, point = ?, updated = ? "
                    "WHERE vm = ? AND disk = ? AND direction = 'failback'",
                    (FAILED_OVER, point, now, vm, disk),
                )
            for vm in vms:
                _set_phase(db, vm, phase, None)

    # -- groups and plans -----------------------------------------------------------

    def put_group(self, name: str, vms: Iterable[str], failback_of: str = "") -> None:
        """Create a group or add VMs to it."""
        with self.transaction() as db:
            _put_group(db, name, vms, failback_of)

    def group(self, name: str) -> Group:
        rows = self._rows("SELECT * FROM groups WHERE name = ?", (name,))
        if not rows:
            raise UnknownObjectError(f"no protection group named {name!r}")
        vms = self._rows("SELECT vm FROM group_vms WHERE grp = ? ORDER BY vm", (name,))
        return Group(name, tuple(r["vm"] for r in vms), rows[0]["failback_of"])

    def groups(self) -> list[Group]:
        return [self.group(r["name"]) for r in self._rows("SELECT name FROM groups ORDER BY name")]

    def put_plan(self, name: str, groups: Iterable[str]) -> None:
        """Create a plan or append groups to it."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO plans (name) VALUES (?)", (name,))
            for grp in groups:
                _add_plan_group(db, name, grp)

    def plan(self, name: str) -> Plan:
        rows = self._rows("SELECT name FROM plans WHERE name = ?", (name,))
        if not rows:
            raise UnknownObjectError(f"no recovery plan named {name!r}")
        groups = self._rows("SELECT grp FROM plan_groups WHERE plan = ? ORDER BY position", (name,))
        return Plan(name, tuple(r["grp"] for r in groups))

    def plans(self) -> list[Plan]:
        return [self.plan(r["name"]) for r in self._rows("SELECT name FROM plans ORDER BY name")]

    def plan_vms(self, name: str) -> list[str]:
        """The VMs of a plan's groups, in group order, each once."""
        seen: dict[str, None] = {}
        for grp in self.plan(name).groups:
            seen.update(dict.fromkeys(self.group(grp).vms))
        return list(seen)

    # -- pairs ----------------------------------------------------------------------

    def set_pair_state(
        self, vm: str, disk: str, direction: str, state: str, point: str = "", *, event: str
    ) -> None:
        """``event`` moves the pair to ``state`` (and sets its point, unless ""); a
        change the pair state table does not list is refused (PairStateError)."""
        with self.transaction() as db:
            _check_pair(db, vm, disk, direction, event, state)
            db.execute(
                "UPDATE pairs SET state = ?, point = CASE WHEN ? = '' THEN point ELSE ? END, "
                "updated = ? WHERE vm = ? AND disk = ? AND direction = ?",
                (state, point, point, time.time(), vm, disk, direction),
            )

    def set_pair_process_server(self, vm: str, disk: str, direction: str, server: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE pairs SET process_server = ?, updated = ? "
                "WHERE vm = ? AND disk = ? AND direction = ?",
                (server, time.time(), vm, disk, direction),
            )

    def pairs(self, vm: str | None = None, direction: str | None = None) -> list[Pair]:
        sql, args = "SELECT * FROM pairs WHERE 1 = 1", []
        if vm is not None:
            sql, args = sql + " AND vm = ?", [*args, vm]
        if direction is not None:
            sql, args = sql + " AND direction = ?", [*args, direction]
        return [Pair(**dict(r)) for r in self._rows(sql + " ORDER BY vm, disk, direction", args)]

    # -- jobs -----------------------------------------------------------------------

    def create_job(
        self, kind: str, target: str, vms: Iterable[str], pid: int, pid_start: str, alive
    ) -> Job:
        """Record a new running job; refuse if a live running job works on one of ``vms``.

        ``alive(pid, pid_start)`` says whether a recorded job's process still runs.
        The check and the insert are one transaction: two orchestrators cannot both
        start a step on the same VM.
        """
        now, job_id, vms = time.time(), uuid.uuid4().hex[:12], sorted(vms)
        with self.transaction() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                other = _job(row)
                if set(other.vms) & set(vms) and alive(other.pid, row["pid_start"]):
                    raise JobBusyError(
                        f"job {other.id} ({other.kind} {other.target}, pid {other.pid}) is "
                        f"running on {', '.join(sorted(set(other.vms) & set(vms)))}",
                        hint="wait for it to end (`replication orchestrate jobs`)",
                    )
            db.execute(
                "INSERT INTO jobs (id, kind, target, state, vms, pid, pid_start, created, "
                "updated) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (job_id, kind, target, json.dumps(vms), pid, pid_start, now, now),
            )
        return self.job(job_id)

    def update_job(self, job_id: str, **changes: Any) -> Job:
        """Set some of a job's columns (``result`` as a dict); return the job."""
        if "result" in changes:
            changes["result"] = json.dumps(changes["result"], sort_keys=True)
        changes["updated"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in changes)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*changes.values(), job_id))
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        rows = self._rows("SELECT * FROM jobs WHERE id = ? OR id LIKE ?", (job_id, f"{job_id}%"))
        if len(rows) != 1:
            raise UnknownObjectError(f"no job {job_id!r} (or the prefix is ambiguous)")
        return _job(rows[0])

    def jobs(self, limit: int = 50) -> list[Job]:
        rows = self._rows("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        return [_job(r) for r in rows]

    def running_jobs(self) -> list[tuple[Job, str]]:
        """Every job recorded as running, with the start stamp of its process."""
        rows = self._rows("SELECT * FROM jobs WHERE state = 'running'")
        return [(_job(r), r["pid_start"]) for r in rows]

    # -- backup and restore ---------------------------------------------------------

    def backup(self, file: str | os.PathLike[str]) -> Path:
        """Write a consistent copy of the store to ``file`` (replaced atomically)."""
        target = Path(file).absolute()
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with contextlib.closing(sqlite3.connect(tmp)) as out:
                self._db.backup(out)
                out.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            _fsync_file(tmp)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except (OSError, sqlite3.Error) as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"back up the store to {target}: {err}") from err
        return target

    def restore(self, file: str | os.PathLike[str]) -> None:
        """Replace the store's content with the backup ``file`` (checked first)."""
        source = Path(file)
        with (
            contextlib.closing(_open_backup(source)) as backup,
            _sqlite_errors(f"restore {self.path} from {source}"),
        ):
            backup.backup(self._db)
            self._db.execute("PRAGMA journal_mode = WAL")
        _migrate(self._db, self.path)


# -- helpers --------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as err:
        raise StoreError(f"open the configuration store {path}: {err}") from err
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Apply the missing migrations, each with its version bump, in one transaction."""
    with _sqlite_errors(f"migrate {path}"):
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{path} has schema version {version}; this orchestrator knows up to "
                f"{SCHEMA_VERSION}",
                hint="use the newer orchestrator that wrote it, or restore an older backup",
            )
        for number in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number + 1}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _open_backup(source: Path) -> sqlite3.Connection:
    """Open a backup read-only and check it is a whole, known store."""
    if not source.is_file():
        raise StoreError(f"backup file {source} does not exist")
    try:
        db = sqlite3.connect(f"file:{source.absolute()}?mode=ro", uri=True)
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as err:
        raise StoreCorruptError(f"{source} is not a configuration store backup: {err}") from err
    problem = _backup_problem(ok, version, tables)
    if problem:
        db.close()
        raise StoreCorruptError(f"{source}: {problem}", hint="restore another backup")
    return db


def _backup_problem(ok: str, version: int, tables: set[str]) -> str:
    if ok != "ok":
        return f"integrity check failed: {ok}"
    if version < 1 or not tables >= _TABLES:
        return "not a configuration store (schema missing)"
    if version > SCHEMA_VERSION:
        return f"schema version {version} is newer than this orchestrator's {SCHEMA_VERSION}"
    return ""


def _upsert(db: sqlite3.Connection, table: str, record: object, key: tuple[str, ...]) -> None:
    names = [f.name for f in fields(record)]  # type: ignore[arg-type]
    values = [getattr(record, n) for n in names]
    updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in key) or "name = name"
    db.execute(
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}",
        values,
    )


def _put_group(db: sqlite3.Connection, name: str, vms: Iterable[str], failback_of: str) -> None:
    db.execute(
        "INSERT OR IGNORE INTO groups (name, failback_of) VALUES (?, ?)", (name, failback_of)
    )
    for vm in vms:
        if not db.execute("SELECT 1 FROM vms WHERE name = ?", (vm,)).fetchone():
            raise _unknown_vm(vm)
        db.execute("INSERT OR IGNORE INTO group_vms (grp, vm) VALUES (?, ?)", (name, vm))


def _add_plan_group(db: sqlite3.Connection, plan: str, grp: str) -> None:
    if not db.execute("SELECT 1 FROM groups WHERE name = ?", (grp,)).fetchone():
        raise UnknownObjectError(f"no protection group named {grp!r}")
    row = db.execute("SELECT COALESCE(MAX(position), 0) FROM plan_groups WHERE plan = ?", (plan,))
    position = row.fetchone()[0] + 1
    db.execute(
        "INSERT OR IGNORE INTO plan_groups (plan, grp, position) VALUES (?, ?, ?)",
        (plan, grp, position),
    )


def _set_phase(db: sqlite3.Connection, vm: str, phase: str, location: str | None) -> None:
    db.execute("UPDATE vms SET phase = ? WHERE name = ?", (phase, vm))
    if location is not None:
        db.execute("UPDATE vms SET location = ? WHERE name = ?", (location, vm))


def _move_to_failback(db: sqlite3.Connection, vm: str) -> None:
    """Reprotect's bookkeeping: the VM moves from each group G to ``G_Failback``,
    created on first use and added to every plan that holds G (the scenario's
    PG1 -> PG1_Failback rule)."""
    rows = db.execute(
        "SELECT g.name FROM groups g JOIN group_vms m ON m.grp = g.name "
        "WHERE m.vm = ? AND g.failback_of = ''",
        (vm,),
    ).fetchall()
    for (grp,) in rows:
        failback = f"{grp}_Failback"
        _put_group(db, failback, [vm], grp)
        db.execute("DELETE FROM group_vms WHERE grp = ? AND vm = ?", (grp, vm))
        plans = db.execute("SELECT plan FROM plan_groups WHERE grp = ?", (grp,)).fetchall()
        for (plan,) in plans:
            _add_plan_group(db, plan, failback)


def _check_pair(
    db: sqlite3.Connection, vm: str, disk: str, direction: str, event: str, state: str
) -> None:
    """Refuse a pair state change the table does not allow (read in the same transaction)."""
    row = db.execute(
        "SELECT state FROM pairs WHERE vm = ? AND disk = ? AND direction = ?",
        (vm, disk, direction),
    ).fetchone()
    check_change(f"{vm}/{disk} ({direction})", row["state"] if row else None, event, state)


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d.pop("pid_start")
    d["result"] = json.loads(d["result"] or "{}")
    d["vms"] = tuple(json.loads(d["vms"] or "[]"))
    return Job(**d)


def _unknown_vm(name: str) -> UnknownVmError:
    return UnknownVmError(
        f"VM {name!r} is not in the configuration store",
        hint="register it (`replication orchestrate register-vm`) or restore the store from a "
        "backup that has it: failback needs the VM in the configuration database",
    )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sqlite_errors(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as err:
        if "malformed" in str(err) or "not a database" in str(err):
            raise StoreCorruptError(
                f"{what}: {err}", hint="restore the store from a backup"
            ) from err
        raise StoreError(f"{what}: {err}") from err
