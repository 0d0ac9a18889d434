"""memctl: administer memoryd memory banks.

Every command is a thin wrapper over the MemoryBackend interface
(memoryd.api): it talks either to a running daemon (--address, through
knnlayer.client.MemoryClient) or opens a data directory in-process
(--data-dir, through memoryd.engine.LocalMemory). Errors are reported as one
line and a non-zero exit status.

This module is the `memctl` group and the status overview; the commands live
by concept in memctl.banks (bank ...), memctl.data (import, export, search),
memctl.lifecycle (session ..., quota ...), memctl.backups (bank snapshot,
bank restore, backup), and what they share (errors,
parameter types, backend selection) in memctl.common.
"""
from __future__ import annotations

import click

import memoryd
from memctl import output
from memctl.backups import backup, bank_restore, bank_snapshot
from memctl.banks import bank
from memctl.common import backend_options, describe_target, json_option, with_backend
from memctl.data import export, import_, search
from memctl.lifecycle import quota, session
from memctl.tokens import token


def _group_backend_options(fn):
    for opt in reversed(backend_options(envvars=False)):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(memoryd.__version__, prog_name="memctl")
@_group_backend_options
def main(**_backend_options):
    """Administer memoryd memory banks: create, size, fill, inspect, export.

    Talks to a running daemon (--address, or ./mem/memoryd.sock when it
    exists) or opens a data directory in-process (--data-dir). The backend
    options work before the command or after it; after it wins.

    \b
    Example:
        memctl --help
        memctl bank create wiki --kind base --dim 128 --value-dim 128 --quota 10GB --index HNSW32
        memctl import wiki keys.npy values.npy
        memctl --address unix:///run/memoryd/memoryd.sock status
        MEMCTL_TOKEN=mdt_... memctl --address 10.0.0.5:7443 --tls-ca ca.pem bank list
    """


@main.command("status")
@json_option
@with_backend
def status(backend, as_json):
    """Show the daemon (or data dir): version, uptime, GPUs, banks, tenants and the
    bank stacks clients searched.

    \b
    Example:
        memctl status
        memctl status --address unix:///run/memoryd/memoryd.sock --json
    """
    st = backend.stats()
    desc = describe_target(click.get_current_context().meta["memctl.target"])
    if as_json:
        click.echo(output.to_json(output.status_dict(st, desc)))
    else:
        click.echo(output.status_text(st, desc))


for _cmd in (bank_snapshot, bank_restore):
    bank.add_command(_cmd)
for _cmd in (bank, import_, export, search, session, quota, token, backup):
    main.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
