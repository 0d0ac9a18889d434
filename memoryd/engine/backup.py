"""Snapshots of one bank, their restore, and a backup of the whole daemon.

A bank snapshot is a folder on the daemon's host:

    snapshot.json   what the bank is (spec, frozen, checksum, rows, bytes) and when
    bank/           the bank's checkpoint files (memoryd.storage), as open() reads them

It is consistent while writes go on: the bank is checkpointed and its
checkpoint files linked (or copied, across file systems) under the bank's
write lock, for the milliseconds that takes; other banks are not held up.
Restoring copies the folder in as a new bank (its own name or another),
checks it against the checksum, and charges its bytes to the quotas.

A daemon backup is a data dir: every bank's snapshot under banks/, and
catalog.db, a SQLite copy of the catalog (tenants, quotas, sessions,
tokens) holding exactly the banks it has files for. Restoring it is
starting `memoryd serve --data-dir` on it (or on a copy); usage is
reconciled with the banks' contents on open, as after any restart.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import memoryd
from memoryd.api import BankInfo, BankSpec
from memoryd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from memoryd.storage.files import atomic_write_json

if TYPE_CHECKING:
    from memoryd.engine.banks import BankEngine

MANIFEST = "snapshot.json"
BACKUP_MANIFEST = "backup.json"
FORMAT = 1


def _empty_dir(dest: str | Path) -> Path:
    """dest as an absolute path, made, and empty (it is the daemon's host's)."""
    path = Path(dest)
    if not path.is_absolute():
        raise InvalidArgument(f"a snapshot folder is a path on the daemon's host and must be "
                              f"absolute; got {str(dest)!r}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlreadyExists(f"{path} exists and is not an empty folder: snapshots never "
                            "overwrite anything")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FailedPrecondition(f"cannot make {path}: {e.strerror or e}") from None
    return path


def snapshot_bank(engine: "BankEngine", name: str, dest: str | Path) -> dict:
    """Snapshot bank `name` into the empty folder dest; its manifest."""
    bank = engine.bank(name)
    if bank.spec.kind == "session":
        raise FailedPrecondition(
            f"'{name}' is a session's bank: promote it into a domain bank to keep it, "
            "or back up the whole daemon (memctl backup)")
    path = _empty_dir(dest)
    with bank.lock.write():
        info = engine.catalog.bank(name)
        bank.snapshot_to(path / "bank")
        checksum, count, nbytes = bank.checksum(), bank.count, bank.nbytes()
    manifest = {"format": FORMAT, "memoryd": memoryd.__version__, "taken_at": time.time(),
                "spec": asdict(info.spec), "frozen": info.frozen, "checksum": checksum,
                "count": count, "used_bytes": nbytes}
    atomic_write_json(path / MANIFEST, manifest)
    return manifest


def read_manifest(src: str | Path) -> dict:
    path = Path(src) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{src} holds no bank snapshot (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"{path} cannot be read as a snapshot manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise FailedPrecondition(f"{path} is snapshot format {manifest.get('format')!r}; this "
                                 f"memoryd reads format {FORMAT}")
    return manifest


def restore_bank(engine: "BankEngine", src: str | Path, name: str | None = None) -> BankInfo:
    """A new bank (named `name`, default the snapshot's) from a snapshot folder."""
    src = Path(src)
    if not src.is_absolute():
        raise InvalidArgument(f"a snapshot folder is a path on the daemon's host and must be "
                              f"absolute; got {str(src)!r}")
    manifest = read_manifest(src)
    spec = BankSpec(**{**manifest["spec"], **({"name": name} if name else {})}).validated()
    with engine._admin:
        storage = f"{spec.name}-{uuid.uuid4().hex[:12]}"
        path = engine._bank_path(storage)
        engine.catalog.create_bank(spec, storage)                       # AlreadyExists
        try:
            shutil.copytree(src / "bank", path)
            bank = engine.new_bank(path, spec).open()
            if bank.checksum() != manifest["checksum"]:
                raise FailedPrecondition(f"the snapshot in {src} does not match its checksum: "
                                         "its files are damaged")
            if bank.count:
                engine.catalog.reserve(spec.name, bank.nbytes(), bank.count, op="restore")
        except BaseException:
            engine.catalog.delete_bank(spec.name)
            shutil.rmtree(path, ignore_errors=True)
            raise
        bank.frozen = bool(manifest["frozen"])
        engine._banks[spec.name] = bank
        engine.catalog.update_bank(spec.name, trained=bank.trained, frozen=bank.frozen,
                                   checksum=manifest["checksum"] if bank.frozen else "")
    return engine.bank_info(spec.name)


def backup(engine: "BankEngine", dest: str | Path) -> dict:
    """Every bank and the catalog into the empty folder dest, as a data dir."""
    path = _empty_dir(dest)
    (path / "banks").mkdir()
    storages = engine.catalog.storages()
    saved, nbytes = [], 0
    for name in sorted(storages):
        try:
            bank = engine.bank(name)
        except NotFound:          # deleted meanwhile
            continue
        with bank.lock.write():
            bank.snapshot_to(path / "banks" / storages[name])
            nbytes += bank.nbytes()
        saved.append(name)
    engine.catalog.copy_to(f"sqlite:///{path / 'catalog.db'}", set(saved))
    manifest = {"format": FORMAT, "memoryd": memoryd.__version__, "taken_at": time.time(),
                "banks": saved, "used_bytes": nbytes}
    atomic_write_json(path / BACKUP_MANIFEST, manifest)
    return manifest
