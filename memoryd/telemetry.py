"""Process-wide metric objects that any layer may update (engine, storage, a router).

This module imports nothing of memoryd's daemon or wire layers (only
prometheus_client), so the storage layer at the bottom and a router at the
top can both import it. The metrics live in `REGISTRY`, a CollectorRegistry
of their own (never prometheus_client's global default): every metrics
endpoint of the process (memoryd.daemon.metrics) exports them next to its
own per-server series. They count for the whole process, whichever
LocalMemory or router did the work.

    series                                          labels          updated by
    memoryd_evicted_rows_total            counter   bank, tenant    evicted() (engine.banks: fifo)
    memoryd_wal_bytes_total               counter   -               wal_appended() (storage.wal)
    memoryd_wal_records_total             counter   -               wal_appended()
    memoryd_wal_fsyncs_total              counter   -               wal_fsynced() (group commit:
                                                                    one fsync, many records)
    memoryd_checkpoint_duration_seconds   histogram -               checkpointed(t0) (storage.bank;
                                                                    _count = checkpoints taken)
    memoryd_fanout_duration_seconds       histogram shard, method   observe_fanout() (a router)
    memoryd_fanout_requests_total         counter   shard, method,  observe_fanout()
                                                    result=ok|error

Session banks (kind "session", named after short-lived session ids) are
counted under bank="(sessions)" so that a daemon serving many sessions does
not grow one series per session for ever.

Every function here is cheap (a lock and an add) and never raises.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["REGISTRY", "LATENCY_BUCKETS", "SESSION_BANKS", "evicted", "wal_appended",
           "wal_fsynced", "now", "checkpointed", "observe_fanout"]

REGISTRY = CollectorRegistry(auto_describe=True)

# 0.1 ms .. 10 s: an RPC, a shard's part of a fan-out
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0, 120.0, 300.0)
SESSION_BANKS = "(sessions)"      # the bank label of every session bank's evictions

EVICTED_ROWS = Counter(
    "memoryd_evicted_rows", "Rows evicted by fifo banks to make room (a write over quota, "
    "or a quota lowered below usage).", ["bank", "tenant"], registry=REGISTRY)
WAL_BYTES = Counter(
    "memoryd_wal_bytes", "Bytes appended to write-ahead logs (record headers included).",
    registry=REGISTRY)
WAL_RECORDS = Counter(
    "memoryd_wal_records", "Records appended to write-ahead logs (one per write).",
    registry=REGISTRY)
WAL_FSYNCS = Counter(
    "memoryd_wal_fsyncs", "fdatasync calls on write-ahead logs (durable acks, group commit).",
    registry=REGISTRY)
CHECKPOINT_SECONDS = Histogram(
    "memoryd_checkpoint_duration_seconds", "Bank checkpoints (files written and fsync'd, log "
    "emptied): duration; _count is the number of checkpoints.", buckets=CHECKPOINT_BUCKETS,
    registry=REGISTRY)
FANOUT_SECONDS = Histogram(
    "memoryd_fanout_duration_seconds", "One shard's part of a fanned-out request, as the "
    "router saw it.", ["shard", "method"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
FANOUT_REQUESTS = Counter(
    "memoryd_fanout_requests", "Requests a router sent to a shard, by result.",
    ["shard", "method", "result"], registry=REGISTRY)


def evicted(spec: Any, rows: int) -> None:
    """A fifo bank (its BankSpec, or anything with .name, .tenant, .kind) evicted rows."""
    try:
        if rows > 0:
            bank = SESSION_BANKS if getattr(spec, "kind", "") == "session" else str(spec.name)
            EVICTED_ROWS.labels(bank, str(getattr(spec, "tenant", ""))).inc(int(rows))
    except Exception:   # noqa: BLE001 - telemetry never fails a write
        pass


def wal_appended(nbytes: int) -> None:
    """One record of nbytes was appended to a write-ahead log."""
    WAL_RECORDS.inc()
    WAL_BYTES.inc(max(0, int(nbytes)))


def wal_fsynced() -> None:
    """One fdatasync of a write-ahead log completed."""
    WAL_FSYNCS.inc()


def now() -> float:
    """A start time for checkpointed() (time.perf_counter)."""
    return time.perf_counter()


def checkpointed(t0: float) -> None:
    """A checkpoint that started at t0 = now() finished."""
    CHECKPOINT_SECONDS.observe(max(0.0, time.perf_counter() - t0))


def observe_fanout(shard: str, method: str, seconds: float, ok: bool) -> None:
    """A router's call of `method` on `shard` took `seconds` and succeeded (ok) or not."""
    try:
        FANOUT_SECONDS.labels(str(shard), str(method)).observe(max(0.0, float(seconds)))
        FANOUT_REQUESTS.labels(str(shard), str(method), "ok" if ok else "error").inc()
    except Exception:   # noqa: BLE001
        pass
