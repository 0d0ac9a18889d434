"""One view of what the shards report about banks and tenants.

The catalog's fields (count, used bytes, quota, frozen, ...) are shared, so
every shard reports the same; where each shard keeps its slice (tier bytes,
data bytes) is its own, and the view sums it.
"""
from __future__ import annotations

from dataclasses import replace

from memoryd.api import BankInfo, TenantInfo


def merge_infos(infos: list[BankInfo]) -> BankInfo:
    """One bank seen from its shards: the catalog's fields (shared, so equal) and
    the sum of where each shard keeps its slice."""
    tiers: dict[str, int] = {}
    for i in infos:
        for t, b in i.tier_bytes.items():
            tiers[t] = tiers.get(t, 0) + b
    return replace(infos[0], tier_bytes=tiers,
                   data_bytes=min(infos[0].used_bytes, sum(i.data_bytes for i in infos)))


def merge_lists(lists) -> list[BankInfo]:
    by: dict[str, list[BankInfo]] = {}
    for infos in lists:
        for i in infos:
            by.setdefault(i.name, []).append(i)
    return [merge_infos(by[name]) for name in sorted(by)]


def merge_tenants(lists) -> list[TenantInfo]:
    by: dict[str, list[TenantInfo]] = {}
    for ts in lists:
        for t in ts:
            by.setdefault(t.name, []).append(t)
    out = []
    for name in sorted(by):
        ts = by[name]
        tiers: dict[str, int] = {}
        for t in ts:
            for k, b in t.tier_bytes.items():
                tiers[k] = tiers.get(k, 0) + b
        out.append(replace(ts[0], tier_bytes=tiers))
    return out
