"""memctl token ...: API tokens for a daemon run with `memoryd serve --auth`.

Tokens are an admin's business: through a daemon these commands need an
admin token (--token / MEMCTL_TOKEN). The first admin token is made on the
data dir itself, before the daemon starts (`--data-dir`, in-process: the
owner of the files has every right). The secret is printed once, on stdout
alone so that `TOKEN=$(memctl token create ...)` keeps it; the catalog keeps
only its hash.
"""
from __future__ import annotations

import click

from memctl import output
from memctl.common import json_option, with_backend


@click.group()
def token():
    """Create, list and revoke API tokens (needs an admin token, or --data-dir).

    \b
    Example:
        memctl --data-dir ./mem token create --admin --name ops
        memctl --catalog-url postgresql+psycopg://memoryd@db/memoryd token create --admin
        memctl token create --tenant acme --name trainer
        memctl token list
    """


@token.command("create")
@click.option("--tenant", default=None, help="the tenant the token acts for (not with --admin)")
@click.option("--read-only", is_flag=True,
              help="search, get, export, list and show only; no writes")
@click.option("--admin", is_flag=True,
              help="every tenant: quotas, tenants, tokens, any bank")
@click.option("--name", default="", help="a label shown by `token list`")
@json_option
@with_backend
def token_create(backend, tenant, read_only, admin, name, as_json):
    """Make a token and print it (once: only its hash is kept).

    A tenant token reads and writes its tenant's banks and sessions
    (--read-only: reads only); an admin token acts on every tenant.

    \b
    Example:
        memctl --data-dir ./mem token create --admin --name ops > admin.token
        ACME=$(memctl token create --tenant acme --name trainer)
        memctl token create --tenant acme --read-only --name dashboards
    """
    if admin and (read_only or tenant):
        raise click.UsageError("--admin acts on every tenant: no --tenant, no --read-only")
    if not admin and not tenant:
        raise click.UsageError("pass --tenant TENANT (or --admin)")
    role = "admin" if admin else "read" if read_only else "write"
    created = backend.create_token(tenant, role, name)
    if as_json:
        click.echo(output.to_json({**created.info.to_dict(), "token": created.token}))
        return
    click.echo(created.token)
    click.echo(f"token {created.info.id} ({role}, {tenant or 'every tenant'}): keep it now, "
               "it is not shown again", err=True)


@token.command("list")
@click.option("--tenant", default=None, help="only this tenant's tokens [default: all]")
@json_option
@with_backend
def token_list(backend, tenant, as_json):
    """List tokens: id, name, tenant, role, created, revoked (never the secrets).

    \b
    Example:
        memctl token list
        memctl token list --tenant acme --json
    """
    infos = backend.list_tokens(tenant)
    if as_json:
        click.echo(output.to_json([t.to_dict() for t in infos]))
    elif not infos:
        click.echo("no tokens")
    else:
        click.echo(output.table(
            ("ID", "NAME", "TENANT", "ROLE", "CREATED", "REVOKED"),
            [(t.id, t.name or "-", t.tenant or "*", t.role, output.timestamp(t.created_at),
              output.timestamp(t.revoked_at) if t.revoked_at else "-") for t in infos]))


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@json_option
@with_backend
def token_revoke(backend, token_id, as_json):
    """Revoke token ID (its id, or the whole token): refused within a second.

    \b
    Example:
        memctl token revoke 3f2a9c01d4e5
        memctl token revoke "$ACME"
    """
    from memoryd.auth.tokens import token_id_of

    info = backend.revoke_token(token_id_of(token_id))
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"token {info.id} revoked")
