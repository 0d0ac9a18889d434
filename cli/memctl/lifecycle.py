"""memctl session ... and memctl quota ...: short-term memory and tenant storage.

A session is a bank written during inference that expires after an idle
and/or absolute time to live; its id is also the name of its bank, so the
bank commands and `memctl search` accept it too. A tenant quota bounds the
bytes of all of a tenant's banks and sessions together.
"""
from __future__ import annotations

import click
import numpy as np

from memoryd.api import EVICTIONS, METRICS, SessionSpec
from memoryd.arrays import VALUE_DTYPES
from memoryd.sizes import format_size
from memctl import output
from memctl.common import DURATION, SIZE, json_option, load_npy, with_backend
from memctl.data import export_bank, export_options


@click.group()
def session():
    """Open, inspect, extend, promote, export and close session memories.

    \b
    Example:
        memctl session open --dim 128 --value-dim 128 --ttl-idle 30m --quota 100MB
        memctl session list
    """


@session.command("open")
@click.option("--dim", type=click.IntRange(1), required=True, help="key dimension")
@click.option("--value-dim", type=click.IntRange(0), default=0, show_default=True,
              help="value dimension (0: keys only)")
@click.option("--value-dtype", type=click.Choice(list(VALUE_DTYPES)), default="float32",
              show_default=True, help="how values are stored")
@click.option("--metric", type=click.Choice(METRICS), default="l2", show_default=True,
              help="l2 (squared distance) or ip (inner product)")
@click.option("--tenant", default="default", show_default=True, help="owning tenant")
@click.option("--ttl-idle", type=DURATION, default=None, metavar="DURATION",
              help="expire after this long unused: 90s, 30m, 2h, 1d [default: never]")
@click.option("--ttl", "ttl_absolute", type=DURATION, default=None, metavar="DURATION",
              help="expire this long after opening: 24h, 7d [default: never]")
@click.option("--quota", type=SIZE, default=None, metavar="SIZE",
              help="byte quota: 100MB, 1GiB, unlimited [default: unlimited]")
@click.option("--eviction", type=click.Choice(EVICTIONS), default="reject", show_default=True,
              help="a write over quota: reject it, or fifo (the oldest memories leave)")
@json_option
@with_backend
def session_open(backend, dim, value_dim, value_dtype, metric, tenant, ttl_idle, ttl_absolute,
                 quota, eviction, as_json):
    """Open a session memory and print its id.

    \b
    Example:
        memctl session open --dim 128 --value-dim 128 --ttl-idle 30m --ttl 24h --quota 100MB
        SID=$(memctl session open --dim 64 --tenant acme --eviction fifo --quota 10MB)
    """
    info = backend.open_session(SessionSpec(
        dim=dim, value_dim=value_dim, value_dtype=value_dtype, metric=metric, tenant=tenant,
        ttl_idle_s=ttl_idle, ttl_absolute_s=ttl_absolute, quota_bytes=quota,
        eviction=eviction))
    click.echo(output.to_json(info.to_dict()) if as_json else info.session_id)


@session.command("list")
@click.option("--tenant", default=None, help="only this tenant's sessions [default: all]")
@json_option
@with_backend
def session_list(backend, tenant, as_json):
    """List open sessions: size, quota, time to live, last use.

    \b
    Example:
        memctl session list
        memctl session list --tenant acme --json
    """
    sessions = backend.list_sessions(tenant)
    if as_json:
        click.echo(output.to_json([x.to_dict() for x in sessions]))
    elif not sessions:
        click.echo("no sessions" + (f" for tenant '{tenant}'" if tenant else ""))
    else:
        click.echo(output.session_table(sessions))


@session.command("show")
@click.argument("session_id", metavar="ID")
@json_option
@with_backend
def session_show(backend, session_id, as_json):
    """Show session ID: count, used/quota, created, last used, expires in.

    \b
    Example:
        memctl session show s-3f2a9c
        memctl session show s-3f2a9c --json
    """
    info = backend.session_info(session_id)
    click.echo(output.to_json(info.to_dict()) if as_json else output.session_block(info))


@session.command("extend")
@click.argument("session_id", metavar="ID")
@click.option("--ttl-idle", type=DURATION, default=None, metavar="DURATION",
              help="new idle time to live: 30m, 2h")
@click.option("--ttl", "ttl_absolute", type=DURATION, default=None, metavar="DURATION",
              help="new absolute time to live, counted from now: 24h, 7d")
@json_option
@with_backend
def session_extend(backend, session_id, ttl_idle, ttl_absolute, as_json):
    """Change the time to live of session ID; its idle clock restarts now.

    \b
    Example:
        memctl session extend s-3f2a9c --ttl-idle 2h
        memctl session extend s-3f2a9c --ttl 7d
    """
    if ttl_idle is None and ttl_absolute is None:
        raise click.UsageError("pass --ttl-idle and/or --ttl")
    info = backend.extend_session(session_id, ttl_idle_s=ttl_idle, ttl_absolute_s=ttl_absolute)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"session '{info.session_id}' expires in {output.expires_in(info.expires_at)} "
                   f"(idle ttl {output.span(info.ttl_idle_s)}, "
                   f"ttl {output.span(info.ttl_absolute_s)})")


@session.command("close")
@click.argument("session_id", metavar="ID")
@with_backend
def session_close(backend, session_id):
    """Close session ID now and free its memory (promote first to keep any of it).

    \b
    Example:
        memctl session close s-3f2a9c
    """
    released = backend.close_session(session_id)
    click.echo(f"closed session '{session_id}' (released {format_size(released)})")


@session.command("promote")
@click.argument("session_id", metavar="ID")
@click.argument("target", metavar="TARGET_BANK")
@click.option("--ids", "ids_path", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="only these session ids (int64 .npy) [default: all]")
@click.option("--min-score", type=float, default=None, metavar="X",
              help="only memories appended with a score of at least X")
@click.option("--dedup", type=click.FloatRange(0, 1), default=None, metavar="SIM",
              help="skip memories this similar (cosine) to one kept: 0.98 [default: keep all]")
@click.option("--move", is_flag=True, help="remove the promoted memories from the session")
@json_option
@with_backend
def session_promote(backend, session_id, target, ids_path, min_score, dedup, move, as_json):
    """Copy (or --move) memories of session ID into bank TARGET_BANK.

    \b
    Example:
        memctl session promote s-3f2a9c med --dedup 0.98
        memctl session promote s-3f2a9c med --ids keep.npy --min-score 0.5 --move
    """
    ids = None
    if ids_path:
        ids = load_npy(ids_path, "ids")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise click.ClickException(f"{ids_path} holds {ids.dtype}{list(ids.shape)}: "
                                       "--ids needs a 1-d array of integer ids")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
    res = backend.promote_session(session_id, target, ids=ids, min_score=min_score,
                                  dedup=dedup, move=move)
    if as_json:
        click.echo(output.to_json({"session": session_id, "target": target,
                                   "promoted": res.promoted, "duplicates": res.duplicates,
                                   "moved": res.moved, "target_ids": res.target_ids,
                                   "source_ids": res.source_ids}))
        return
    notes = ([f"{output.count(res.duplicates)} duplicates skipped"] if dedup is not None else []) \
        + (["moved out of the session"] if res.moved else [])
    click.echo(f"promoted {output.count(res.promoted)} memories from session '{session_id}' "
               f"to bank '{target}'" + (f" ({'; '.join(notes)})" if notes else ""))


@session.command("append")
@click.argument("session_id", metavar="ID")
@click.argument("keys_path", metavar="KEYS.npy", type=click.Path(dir_okay=False))
@click.argument("values_path", metavar="[VALUES.npy]", required=False,
                type=click.Path(dir_okay=False))
@click.option("--scores", "scores_path", type=click.Path(dir_okay=False), metavar="SCORES.npy",
              help="one float score per row, for `session promote --min-score`")
@click.option("--ids-out", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="write the ids the session gave the rows here (int64)")
@with_backend
def session_append(backend, session_id, keys_path, values_path, scores_path, ids_out):
    """Append the rows of KEYS.npy (and VALUES.npy, SCORES.npy) to session ID.

    One call, stored atomically; for big files into ordinary banks use
    `memctl import`.

    \b
    Example:
        memctl session append s-3f2a9c keys.npy values.npy --scores attention.npy
    """
    keys = load_npy(keys_path, "keys")
    values = load_npy(values_path, "values") if values_path else None
    scores = load_npy(scores_path, "scores") if scores_path else None
    n = len(keys) if keys.ndim else 0
    for path, a in ((values_path, values), (scores_path, scores)):
        if a is not None and (a.ndim == 0 or len(a) != n):
            raise click.ClickException(f"{keys_path} has {n} rows but {path} has "
                                       f"{len(a) if a.ndim else 0}")
    ids = np.asarray(backend.append(session_id, np.ascontiguousarray(keys),
                                    None if values is None else np.ascontiguousarray(values),
                                    None if scores is None else np.ascontiguousarray(scores)))
    if ids_out:
        np.save(ids_out, ids.astype(np.int64, copy=False))
    span = f" (ids {int(ids.min())}..{int(ids.max())})" if ids.size else ""
    click.echo(f"appended {output.count(len(ids))} memories to session '{session_id}'{span}"
               + (f"; ids written to {ids_out}" if ids_out else ""))


@session.command("export")
@click.argument("session_id", metavar="ID")
@click.argument("outdir", type=click.Path(file_okay=False))
@export_options
@with_backend
def session_export(backend, session_id, outdir, chunk_rows, force, progress, quiet):
    """Write session ID to OUTDIR/ids.npy, keys.npy and values.npy (as `memctl export`).

    \b
    Example:
        memctl session export s-3f2a9c dumps/s-3f2a9c
    """
    info = backend.session_info(session_id)   # NotFound names the session, not a bank
    click.echo(export_bank(backend, info.bank.spec.name, outdir, chunk_rows=chunk_rows,
                           force=force, progress=False if quiet else progress,
                           what="session "))


# ---- tenant quotas ---------------------------------------------------------------

@click.group()
def quota():
    """Set and show tenant quotas: the bytes all of a tenant's banks and sessions may use.

    \b
    Example:
        memctl quota set acme 50GB
        memctl quota show
    """


@quota.command("set")
@click.argument("tenant")
@click.argument("size", type=SIZE, metavar="SIZE")
@json_option
@with_backend
def quota_set(backend, tenant, size, as_json):
    """Set the byte quota of TENANT: 50GB, 512MiB or unlimited.

    A quota below what the tenant already uses is refused.

    \b
    Example:
        memctl quota set acme 50GB
        memctl quota set acme unlimited
    """
    info = backend.set_tenant_quota(tenant, size)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"tenant '{info.name}' quota: {format_size(info.quota_bytes)} (used "
                   f"{format_size(info.used_bytes)}, "
                   f"{output.percent(info.used_bytes, info.quota_bytes)})")


@quota.command("show")
@click.argument("tenant", required=False)
@json_option
@with_backend
def quota_show(backend, tenant, as_json):
    """Show quota, usage, bytes per tier, banks and sessions of TENANT (default: all).

    \b
    Example:
        memctl quota show
        memctl quota show acme --json
    """
    if tenant:
        info = backend.tenant_info(tenant)
        click.echo(output.to_json(info.to_dict()) if as_json else output.tenant_block(info))
        return
    tenants = backend.list_tenants()
    if as_json:
        click.echo(output.to_json([t.to_dict() for t in tenants]))
    elif not tenants:
        click.echo("no tenants")
    else:
        click.echo(output.tenant_table(tenants))
