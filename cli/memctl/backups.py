"""memctl bank snapshot / bank restore / backup: folders on the daemon's host.

Each is one call of memoryd's backup plane (memoryd.engine.backup); a
relative DIR is made absolute here (with --data-dir, or a daemon on this
host, that is where it is; for a remote daemon, give its host's path).
"""
from __future__ import annotations

import os

import click

from memctl import output
from memctl.common import json_option, with_backend
from memoryd.sizes import format_size


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


@click.command("snapshot")
@click.argument("name")
@click.argument("dir", metavar="DIR")
@json_option
@with_backend
def bank_snapshot(backend, name, dir, as_json):
    """Snapshot bank NAME into DIR (new or empty), consistent while writes go on.

    DIR is a folder on the daemon's host; the bank is checkpointed and its
    files linked there (copied across file systems) in one step, so the
    snapshot is the bank as of one moment.

    \b
    Example:
        memctl bank snapshot wiki /backups/wiki-2026-12-01
        memctl bank restore /backups/wiki-2026-12-01 --name wiki-old
    """
    info = backend.snapshot_bank(name, _abs(dir))
    if as_json:
        click.echo(output.to_json(info.__dict__))
    else:
        click.echo(f"snapshot of bank '{name}' in {info.path}: {output.count(info.count)} items, "
                   f"{format_size(info.used_bytes)}, checksum {info.checksum}")


@click.command("restore")
@click.argument("dir", metavar="DIR")
@click.option("--name", default=None, help="the new bank's name [default: the snapshot's]")
@json_option
@with_backend
def bank_restore(backend, dir, name, as_json):
    """Restore a bank snapshot from DIR as a new bank (its bytes count against quotas).

    \b
    Example:
        memctl bank restore /backups/wiki-2026-12-01
        memctl bank restore /backups/wiki-2026-12-01 --name wiki-old --json
    """
    info = backend.restore_bank(_abs(dir), name)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"restored bank '{info.name}' from {_abs(dir)}: {output.count(info.count)} "
                   f"items, {format_size(info.used_bytes)}")


@click.command("backup")
@click.argument("dir", metavar="DIR")
@json_option
@with_backend
def backup(backend, dir, as_json):
    """Back up every bank, session and the catalog into DIR (new or empty): a data dir.

    Restore it by serving it: memoryd serve --data-dir DIR (or a copy of it).

    \b
    Example:
        memctl backup /backups/memoryd-2026-12-01
        memoryd serve --data-dir /backups/memoryd-2026-12-01 --listen unix:///tmp/restored.sock
    """
    info = backend.backup(_abs(dir))
    if as_json:
        click.echo(output.to_json({**info.__dict__, "banks": list(info.banks)}))
    else:
        click.echo(f"backup in {info.path}: {len(info.banks)} banks, {format_size(info.used_bytes)}")
