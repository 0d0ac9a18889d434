"""memctl bank ...: create, list, show, delete, freeze, resize, tier."""
from __future__ import annotations

import click

from memoryd.api import EVICTIONS, KINDS, METRICS, TIERS, BankSpec
from memoryd.arrays import VALUE_DTYPES
from memoryd.sizes import format_size
from memctl import output
from memctl.common import SIZE, json_option, with_backend


@click.group()
def bank():
    """Create, list, inspect, freeze, resize, move and delete banks.

    \b
    Example:
        memctl bank create wiki --dim 128 --value-dim 128 --quota 10GB
        memctl bank list
    """


@bank.command("create")
@click.argument("name")
@click.option("--dim", type=click.IntRange(1), required=True, help="key dimension")
@click.option("--value-dim", type=click.IntRange(0), default=0, show_default=True,
              help="value dimension (0: the bank holds keys only)")
@click.option("--kind", type=click.Choice(KINDS), default="domain", show_default=True,
              help="base (pre-trained, frozen later), domain, or session memory")
@click.option("--value-dtype", type=click.Choice(list(VALUE_DTYPES)), default="float32",
              show_default=True, help="how values are stored")
@click.option("--metric", type=click.Choice(METRICS), default="l2", show_default=True,
              help="l2 (squared distance, smaller is better) or ip (inner product)")
@click.option("--index", "index_spec", default="Flat", show_default=True, metavar="SPEC",
              help="faiss index_factory spec: Flat, HNSW32, IVF1024,Flat, ...")
@click.option("--shards", type=click.IntRange(1), default=1, show_default=True,
              help="number of index shards")
@click.option("--quota", type=SIZE, default=None, metavar="SIZE",
              help="byte quota: 10GB, 512MiB, unlimited [default: unlimited]")
@click.option("--tenant", default="default", show_default=True, help="owning tenant")
@click.option("--tier", type=click.Choice(TIERS), default="ram", show_default=True,
              help="where the bank lives: ram, mmap (rows on disk) or gpu")
@click.option("--eviction", type=click.Choice(EVICTIONS), default="reject", show_default=True,
              help="a write over quota: reject it, or fifo (the oldest rows leave)")
@click.option("--key-version", default="", metavar="HASH",
              help="which query projection made the keys (knnlayer.domain.key_version), "
                   "so stale keys can be detected [default: none]")
@json_option
@with_backend
def bank_create(backend, name, dim, value_dim, kind, value_dtype, metric, index_spec,
                shards, quota, tenant, tier, eviction, key_version, as_json):
    """Create bank NAME.

    \b
    Example:
        memctl bank create wiki --kind base --dim 128 --value-dim 128 --quota 10GB --index HNSW32
        memctl bank create chat-42 --kind session --dim 64 --value-dim 64 --value-dtype bfloat16
        memctl bank create recent --dim 128 --quota 1GB --eviction fifo --tier mmap
        memctl bank create med --dim 128 --value-dim 128 --key-version 3f2a9c01d4e5b6a7
    """
    spec = BankSpec(name=name, dim=dim, value_dim=value_dim, kind=kind,
                    value_dtype=value_dtype, metric=metric, index=index_spec, shards=shards,
                    quota_bytes=quota, tenant=tenant, tier=tier, eviction=eviction,
                    key_version=key_version).validated()
    info = backend.create_bank(spec)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
        return
    s = info.spec
    extra = "".join([f", tier {s.tier}" if s.tier != "ram" else "",
                     f", eviction {s.eviction}" if s.eviction != "reject" else "",
                     f", key version {s.key_version}" if s.key_version else ""])
    click.echo(f"created bank '{s.name}': {s.kind}, dim {s.dim}, values "
               f"{output.values_desc(info)}, {s.metric}, {s.index}, {s.shards} shard"
               f"{'s' if s.shards != 1 else ''}, quota {format_size(s.quota_bytes)}{extra}")


@bank.command("list")
@click.option("--tenant", default=None, help="only this tenant's banks [default: all]")
@json_option
@with_backend
def bank_list(backend, tenant, as_json):
    """List banks with their shape, tier, usage and quota.

    \b
    Example:
        memctl bank list
        memctl bank list --tenant acme --json
    """
    banks = backend.list_banks(tenant)
    if as_json:
        click.echo(output.to_json([b.to_dict() for b in banks]))
    elif not banks:
        click.echo("no banks" + (f" for tenant '{tenant}'" if tenant else ""))
    else:
        click.echo(output.bank_table(banks))


@bank.command("show")
@click.argument("name")
@json_option
@with_backend
def bank_show(backend, name, as_json):
    """Show everything about bank NAME, bytes per tier included.

    \b
    Example:
        memctl bank show wiki
        memctl bank show wiki --json
    """
    info = backend.bank_info(name)
    click.echo(output.to_json(info.to_dict()) if as_json else output.bank_block(info))


@bank.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@with_backend
def bank_delete(backend, name, yes):
    """Delete bank NAME and all its keys and values (asks first).

    \b
    Example:
        memctl bank delete chat-42
        memctl bank delete chat-42 --yes
    """
    info = backend.bank_info(name)
    if not yes:
        click.confirm(f"delete bank '{name}' with {output.count(info.count)} items "
                      f"({format_size(info.used_bytes)})?", abort=True, err=True)
    released = backend.delete_bank(name)
    click.echo(f"deleted bank '{name}' (released {format_size(released)})")


@bank.command("freeze")
@click.argument("name")
@json_option
@with_backend
def bank_freeze(backend, name, as_json):
    """Make bank NAME read-only and checksum it (e.g. a base bank after pre-training).

    \b
    Example:
        memctl bank freeze wiki
    """
    info = backend.freeze_bank(name)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"froze bank '{name}': {output.count(info.count)} items, "
                   f"checksum {info.checksum or '-'}")


@bank.command("resize")
@click.argument("name")
@click.option("--quota", type=SIZE, required=True, metavar="SIZE",
              help="new byte quota: 50GB, 512MiB, or unlimited")
@json_option
@with_backend
def bank_resize(backend, name, quota, as_json):
    """Set the byte quota of bank NAME (grow memory without retraining).

    \b
    Example:
        memctl bank resize wiki --quota 50GB
        memctl bank resize wiki --quota unlimited
    """
    old = backend.bank_info(name)
    info = backend.set_quota(name, quota)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"bank '{name}' quota: {format_size(old.spec.quota_bytes)} -> "
                   f"{format_size(info.spec.quota_bytes)} (used {format_size(info.used_bytes)}, "
                   f"{output.percent(info.used_bytes, info.spec.quota_bytes)})")


@bank.command("tier")
@click.argument("name")
@click.option("--tier", type=click.Choice(TIERS), required=True,
              help="ram (in memory), mmap (rows and flat codes on disk) or gpu")
@json_option
@with_backend
def bank_tier(backend, name, tier, as_json):
    """Move bank NAME to another tier while it stays searchable.

    \b
    Example:
        memctl bank tier wiki --tier mmap
        memctl bank tier wiki --tier gpu --json
    """
    old = backend.bank_info(name)
    info = backend.set_tier(name, tier)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"bank '{name}' tier: {old.spec.tier} -> {info.spec.tier} "
                   f"({output.tier_bytes(info.tier_bytes)})")
