"""Rendering for memctl: plain-text tables, key/value blocks, JSON, and a
streaming .npy writer for export. No backend calls here."""
from __future__ import annotations

import datetime as _dt
import json
import math
import struct
import time
from dataclasses import asdict
from typing import Any, Iterable, Sequence

import numpy as np

from memoryd.api import BankInfo, SessionInfo, Stats, TenantInfo
from memoryd.sizes import format_size


# ---- plain values -----------------------------------------------------------

def count(n: int) -> str:
    return f"{n:,}"


def duration(seconds: float) -> str:
    """12 -> '12s', 3725 -> '1h 2m 5s', 200000 -> '2d 7h 33m'."""
    s = int(max(0.0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (s, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{v}{u}" for v, u in parts[:3])


def span(seconds: float | None, parts: int = 2) -> str:
    """A compact duration: 1800 -> '30m', 5400 -> '1h 30m', 90 -> '1m 30s'; None -> '-'."""
    if seconds is None:
        return "-"
    s = int(round(max(0.0, seconds)))
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        v, s = divmod(s, size)
        if v or (out and len(out) < parts):
            out.append((v, unit))
        if len(out) == parts:
            break
    while len(out) > 1 and out[-1][0] == 0:
        out.pop()
    return " ".join(f"{v}{u}" for v, u in out) or "0s"


def ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return "-"
    return span((now or time.time()) - t) + " ago"


def expires_in(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "never"
    left = t - (now or time.time())
    return span(left) if left > 0 else "expired"


TIER_KEYS = ("ram", "disk", "gpu")


def tier_bytes(tb: dict[str, int] | None) -> str:
    """{'ram': 10, 'disk': 2048} -> 'ram 10 B, disk 2.0 KiB, gpu 0 B'; '-' when unknown."""
    if not tb:
        return "-"
    keys = list(TIER_KEYS) + sorted(k for k in tb if k not in TIER_KEYS)
    return ", ".join(f"{k} {format_size(int(tb.get(k, 0)))}" for k in keys)


def _tier_cells(tb: dict[str, int] | None) -> list[str]:
    return [format_size(int(tb[k])) if tb and k in tb else "-" for k in TIER_KEYS]


def timestamp(t: float) -> str:
    if not t:
        return "-"
    return _dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def percent(used: int, quota: int | None) -> str:
    if quota is None:
        return "-"
    if quota == 0:
        return "100%" if used else "0%"
    return f"{100.0 * used / quota:.0f}%"


def values_desc(info: BankInfo) -> str:
    s = info.spec
    return f"{s.value_dim} x {s.value_dtype}" if s.value_dim else "-"


# ---- tables -----------------------------------------------------------------

def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Sequence[str] = ()) -> str:
    """A space-aligned text table; columns named in `right` are right-aligned."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    align_right = [h in right for h in headers]

    def line(cells):
        out = [c.rjust(w) if ar else c.ljust(w)
               for c, w, ar in zip(cells, widths, align_right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


BANK_COLUMNS = ("NAME", "KIND", "DIM", "VALUES", "METRIC", "INDEX", "SHARDS", "TIER",
                "COUNT", "USED", "QUOTA", "FROZEN")
_BANK_RIGHT = ("DIM", "SHARDS", "COUNT", "USED", "QUOTA", "USE%", "RAM", "DISK", "GPU",
               "BANKS", "SESSIONS", "SEARCHES")


def bank_table(banks: Sequence[BankInfo]) -> str:
    with_tenant = any(b.spec.tenant != "default" for b in banks)
    headers = (("TENANT",) if with_tenant else ()) + BANK_COLUMNS
    rows = []
    for b in banks:
        s = b.spec
        row = [s.name, s.kind, s.dim, values_desc(b), s.metric, s.index, s.shards, s.tier,
               count(b.count), format_size(b.used_bytes), format_size(s.quota_bytes),
               "yes" if b.frozen else "no"]
        rows.append(([s.tenant] if with_tenant else []) + row)
    return table(headers, rows, right=_BANK_RIGHT)


def bank_block(b: BankInfo) -> str:
    s = b.spec
    fields = [
        ("name", s.name), ("tenant", s.tenant), ("kind", s.kind), ("dim", s.dim),
        ("values", values_desc(b)), ("metric", s.metric), ("index", s.index),
        ("shards", s.shards), ("count", count(b.count)),
        ("used", format_size(b.used_bytes) if b.used_bytes < 1024
         else f"{format_size(b.used_bytes)} ({b.used_bytes} B)"),
        ("quota", format_size(s.quota_bytes) if s.quota_bytes is None
         else f"{format_size(s.quota_bytes)} ({s.quota_bytes} B, "
              f"{percent(b.used_bytes, s.quota_bytes)} used)"),
        ("held as", f"data {format_size(b.data_bytes)} + index {format_size(b.index_bytes)}"),
        ("eviction", s.eviction), ("tier", s.tier), ("tier bytes", tier_bytes(b.tier_bytes)),
        ("frozen", "yes" if b.frozen else "no"), ("trained", "yes" if b.trained else "no"),
        ("checksum", b.checksum or "-"), ("key version", s.key_version or "-"),
        ("created", timestamp(b.created_at)), ("updated", timestamp(b.updated_at)),
    ]
    return block(fields)


def block(fields: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in fields) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in fields)


# ---- sessions and tenants ------------------------------------------------------

def _used_of(used: int, quota: int | None) -> str:
    if quota is None:
        return f"{format_size(used)} (no quota)"
    return f"{format_size(used)} of {format_size(quota)} ({percent(used, quota)})"


def session_table(sessions: Sequence[SessionInfo], now: float | None = None) -> str:
    rows = [[x.session_id, x.tenant, x.bank.spec.dim, count(x.bank.count),
             format_size(x.bank.used_bytes), format_size(x.bank.spec.quota_bytes),
             span(x.ttl_idle_s), span(x.ttl_absolute_s), ago(x.last_used_at, now),
             expires_in(x.expires_at, now)] for x in sessions]
    return table(("SESSION", "TENANT", "DIM", "COUNT", "USED", "QUOTA", "IDLE-TTL", "TTL",
                  "LAST USED", "EXPIRES IN"), rows, right=("DIM", "COUNT", "USED", "QUOTA"))


def session_block(x: SessionInfo, now: float | None = None) -> str:
    b, s = x.bank, x.bank.spec
    return block([
        ("session", x.session_id), ("tenant", x.tenant), ("dim", s.dim),
        ("values", values_desc(b)), ("metric", s.metric), ("count", count(b.count)),
        ("used", _used_of(b.used_bytes, s.quota_bytes)), ("eviction", s.eviction),
        ("created", timestamp(x.created_at)),
        ("last used", f"{timestamp(x.last_used_at)} ({ago(x.last_used_at, now)})"),
        ("idle ttl", span(x.ttl_idle_s)), ("ttl", span(x.ttl_absolute_s)),
        ("expires in", expires_in(x.expires_at, now)
         + (f" (at {timestamp(x.expires_at)})" if x.expires_at else "")),
    ])


def tenant_table(tenants: Sequence[TenantInfo]) -> str:
    rows = [[t.name, format_size(t.quota_bytes), format_size(t.used_bytes),
             percent(t.used_bytes, t.quota_bytes), *_tier_cells(t.tier_bytes), t.banks,
             t.sessions] for t in tenants]
    return table(("TENANT", "QUOTA", "USED", "USE%", "RAM", "DISK", "GPU", "BANKS", "SESSIONS"),
                 rows, right=_BANK_RIGHT)


def tenant_block(t: TenantInfo) -> str:
    return block([("tenant", t.name), ("quota", format_size(t.quota_bytes)),
                  ("used", _used_of(t.used_bytes, t.quota_bytes)),
                  ("tier bytes", tier_bytes(t.tier_bytes)), ("banks", t.banks),
                  ("sessions", t.sessions)])


def stack_table(stacks, now: float | None = None) -> str:
    rows = [[u.client, ",".join(u.banks), count(u.searches), ago(u.last_used_at, now)]
            for u in stacks]
    return table(("CLIENT", "STACK", "SEARCHES", "LAST USED"), rows, right=("SEARCHES",))


def status_text(st: Stats, backend_desc: str) -> str:
    total_count = sum(b.count for b in st.banks)
    quotas = [b.spec.quota_bytes for b in st.banks]
    total_quota = None if any(q is None for q in quotas) else sum(quotas)
    head = [
        ("memoryd", st.version), ("backend", backend_desc), ("data dir", st.data_dir or "-"),
        ("catalog", st.catalog_url or "-"), ("uptime", duration(st.uptime_s)),
        ("GPUs", st.num_gpus),
        ("banks", f"{len(st.banks)} ({count(total_count)} items, "
                  f"{format_size(st.used_bytes)} used)"),
    ]
    width = max(len(k) for k, _ in head) + 1
    out = "\n".join(f"{k + ':':<{width}} {v}" for k, v in head)
    if st.banks:
        rows = [[b.spec.tenant, b.spec.name, b.spec.kind, count(b.count),
                 format_size(b.used_bytes), format_size(b.spec.quota_bytes),
                 percent(b.used_bytes, b.spec.quota_bytes), "yes" if b.frozen else "no"]
                for b in st.banks]
        rows.append(["TOTAL", "", "", count(total_count), format_size(st.used_bytes),
                     format_size(total_quota) if st.banks else "-",
                     percent(st.used_bytes, total_quota), ""])
        out += "\n\n" + table(("TENANT", "BANK", "KIND", "COUNT", "USED", "QUOTA", "USE%",
                               "FROZEN"), rows, right=_BANK_RIGHT)
    tenants = getattr(st, "tenants", None) or []
    if tenants:
        out += "\n\ntenants:\n" + _indent(tenant_table(tenants))
    stacks = getattr(st, "stacks", None) or []
    if stacks:
        out += "\n\nbank stacks searched (most recent first):\n" + _indent(stack_table(stacks))
    return out


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def status_dict(st: Stats, backend_desc: str) -> dict[str, Any]:
    d = asdict(st)
    d["banks"] = [b.to_dict() for b in st.banks]
    quotas = [b.spec.quota_bytes for b in st.banks]
    d["backend"] = backend_desc
    d["totals"] = {
        "banks": len(st.banks),
        "count": sum(b.count for b in st.banks),
        "used_bytes": st.used_bytes,
        "quota_bytes": None if any(q is None for q in quotas) else sum(quotas),
    }
    return d


# ---- search results ----------------------------------------------------------

def preview(v: np.ndarray, n: int = 4) -> str:
    head = ", ".join(f"{float(x):.4g}" for x in v[:n])
    return f"[{head}{', ...' if len(v) > n else ''}]"


def search_rows(result, banks: Sequence[str], qi: int) -> list[dict[str, Any]]:
    """The found results of query qi as dicts (missing slots are left out)."""
    out = []
    for j in range(result.ids.shape[1]):
        if result.ids[qi, j] < 0:
            continue
        row = {"rank": j + 1, "bank": banks[int(result.bank[qi, j])],
               "id": int(result.ids[qi, j]), "score": float(result.scores[qi, j])}
        if result.values is not None:
            row["value"] = np.asarray(result.values[qi, j], dtype=np.float32).tolist()
        out.append(row)
    return out


def search_text(result, banks: Sequence[str], first_query: int = 0) -> str:
    blocks = []
    for qi in range(result.ids.shape[0]):
        rows = search_rows(result, banks, qi)
        headers = ("RANK", "BANK", "ID", "SCORE") + (("VALUE",) if result.values is not None
                                                    else ())
        body = [[r["rank"], r["bank"], r["id"], f"{r['score']:.6g}"]
                + ([preview(np.asarray(r["value"]))] if "value" in r else []) for r in rows]
        text = table(headers, body, right=("RANK", "ID", "SCORE")) if body else "  (no results)"
        blocks.append(f"query {first_query + qi}:\n" + "\n".join(
            "  " + ln for ln in text.splitlines()))
    return "\n\n".join(blocks)


# ---- JSON --------------------------------------------------------------------

def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot encode {type(o).__name__} as JSON")


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def to_json(obj: Any) -> str:
    """Strict JSON (NaN/inf become null), indented, numpy-aware."""
    return json.dumps(_finite(json.loads(json.dumps(obj, default=_default))), indent=2,
                      allow_nan=False)


# ---- streaming .npy writer ----------------------------------------------------

class NpyWriter:
    """Append rows to an .npy file whose row count is only known at the end.

    The header is written with room to spare and rewritten with the final
    shape on close (it is padded with spaces, which the format allows), so
    export needs neither the whole array in memory nor a second copy on disk.
    """

    HEADER_BYTES = 256  # magic + length + dict, a multiple of 64

    def __init__(self, path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._f = open(path, "wb")
        self._write_header()

    def _write_header(self) -> None:
        shape = (self.rows,) + self.row_shape
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
             "shape": shape}
        body = repr(d).encode("latin1")
        room = self.HEADER_BYTES - 10
        if len(body) + 1 > room:
            raise ValueError(f"npy header too long for shape {shape}")
        body = body + b" " * (room - len(body) - 1) + b"\n"
        self._f.seek(0)
        self._f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + body)
        self._f.seek(0, 2)

    def write(self, rows: np.ndarray) -> None:
        a = np.ascontiguousarray(rows, dtype=self.dtype)
        if a.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {a.shape[1:]} written to {self.path} "
                             f"of rows {self.row_shape}")
        self._f.write(a.tobytes())
        self.rows += a.shape[0]

    def close(self) -> None:
        if not self._f.closed:
            self._write_header()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
