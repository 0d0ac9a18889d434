"""Prometheus metrics of one memoryd process: the HTTP endpoint, the gRPC
interceptor and the collector that reads the backend at scrape time.

    `memoryd serve --metrics-listen HOST:PORT`  (env MEMORYD_METRICS_LISTEN,
    TOML metrics_listen; default off; an empty HOST is every interface, port 0
    picks one; the bound address is the `metrics` field of the start log line)

    registry = new_registry()
    server, address = create_server(backend, listen,
                                    interceptors=[metrics_interceptor(registry)])
    stop, where = start_metrics("127.0.0.1:9464", backend, registry=registry)
    ...
    stop()

A router builds the same with `banks=False` (its shards export their banks)
and reports its fan-out through memoryd.telemetry.observe_fanout.

Every server has its own CollectorRegistry (never prometheus_client's
global one), so several servers in one process (tests) never clash. The
process-wide series of memoryd.telemetry (evictions, WAL, checkpoints,
fan-out) are exported by every endpoint of the process.

Series (all gauges read at scrape time unless said otherwise):

    memoryd_up                               -                      1 while the endpoint answers
    memoryd_build_info                       version                1
    memoryd_scrape_errors_total      counter source                 backend reads that raised
                                                                    (source: list_banks |
                                                                    list_tenants | list_sessions)
    memoryd_scrape_duration_seconds          -                      reading the backend, last scrape
    memoryd_bank_info                        bank, tenant, kind,    1 per bank (tier: its tier
                                             tier, index, metric,   setting ram|mmap|gpu)
                                             eviction
    memoryd_bank_used_bytes                  bank, tenant, kind     bytes charged against quotas
                                                                    (= BankInfo.used_bytes)
    memoryd_bank_tier_bytes                  bank, tenant, kind,    where they sit (BankInfo.tier_bytes:
                                             tier                   tier = ram | gpu | disk; disk is
                                                                    the bank's files, not in used)
    memoryd_bank_items                       bank, tenant, kind     rows (= BankInfo.count)
    memoryd_bank_quota_bytes                 bank, tenant, kind     ABSENT when unlimited
    memoryd_bank_frozen                      bank, tenant, kind     1 frozen, 0 not
    memoryd_tenant_used_bytes                tenant                 all its banks and sessions
    memoryd_tenant_quota_bytes               tenant                 ABSENT when unlimited
    memoryd_tenant_banks                     tenant                 banks (TenantInfo.banks)
    memoryd_sessions_open                    tenant                 open sessions
    memoryd_session_used_bytes               tenant                 bytes of its sessions' banks
    memoryd_session_items                    tenant                 rows of its sessions' banks
    memoryd_rpc_requests_total       counter service, method, code  finished RPCs (code: the gRPC
                                                                    status name, OK included)
    memoryd_rpc_errors_total         counter service, method, code  the same, code != OK only
    memoryd_rpc_duration_seconds     histogram service, method      call start .. reply sent (a
                                                                    streamed reply: its last message)
    memoryd_rpc_in_flight                    service, method        calls being handled now
    + memoryd.telemetry's series, and process_* / python_* (prometheus_client's defaults)

Session banks (kind "session") are left out of the memoryd_bank_* series
(one series per short-lived session would never end); the memoryd_session_*
series sum them per tenant. `session_banks=True` puts them back in.
Health (grpc.health.v1.Health) and reflection RPCs are not counted.

A scrape never fails because of the backend: each read (list_banks,
list_tenants, list_sessions, with caller=None: the owner's) that raises
counts in memoryd_scrape_errors_total{source} and its series are skipped.

Importing this module turns off prometheus_client's `*_created` series for
the whole process (they double the series count and nothing here reads them).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import disable_created_metrics, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from memoryd import __version__, telemetry
from memoryd.api import MemoryBackend

log = logging.getLogger("memoryd.metrics")
disable_created_metrics()   # no *_created series (prometheus_client's switch is per process)

EXCLUDED_SERVICES = frozenset({"grpc.health.v1.Health",
                               "grpc.reflection.v1alpha.ServerReflection",
                               "grpc.reflection.v1.ServerReflection"})
SOURCES = ("list_banks", "list_tenants", "list_sessions")


class MetricsListenError(ValueError):
    """A metrics listen address that is not HOST:PORT."""


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' (every interface) or '[v6]:PORT' -> (host, port)."""
    text = str(listen).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsListenError(f"metrics listen address must be HOST:PORT (e.g. "
                                 f"127.0.0.1:9464, :9464, [::1]:9464); got {listen!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


# ---- the registry -------------------------------------------------------------------

class _Telemetry:
    """memoryd.telemetry's process-wide series, in a per-server registry."""

    def collect(self):
        return telemetry.REGISTRY.collect()


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A registry with prometheus_client's process/platform/gc collectors and
    memoryd.telemetry's series; add a BackendCollector and an interceptor."""
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    registry.register(_Telemetry())
    return registry


# ---- the backend, read at scrape time -------------------------------------------------

def _labels(info) -> list[str]:
    spec = info.spec
    return [str(spec.name), str(spec.tenant), str(spec.kind)]


class BackendCollector:
    """Gauges of banks, tenants and sessions, read from any MemoryBackend at
    scrape time (module doc). Thread-safe; collect() never raises."""

    def __init__(self, backend: MemoryBackend | None, *, banks: bool = True,
                 tenants: bool = True, sessions: bool = True, session_banks: bool = False):
        self.backend = backend
        on = backend is not None
        self.banks, self.tenants, self.sessions = banks and on, tenants and on, sessions and on
        self.session_banks = session_banks
        self._errors = {s: 0 for s in SOURCES}
        self._lock = threading.Lock()

    def _read(self, source: str, call: Callable[[], Any]):
        try:
            return list(call())
        except Exception as e:   # noqa: BLE001 - a scrape must never fail
            with self._lock:
                self._errors[source] += 1
            log.warning("metrics scrape: %s failed", source,
                        extra={"fields": {"source": source, "error": f"{type(e).__name__}: {e}"}})
            return None

    def collect(self) -> Iterable:
        t0 = time.perf_counter()
        out: list = []
        up = GaugeMetricFamily("memoryd_up", "1 while this memoryd process answers scrapes.")
        up.add_metric([], 1)
        build = GaugeMetricFamily("memoryd_build_info", "memoryd's version (the value is 1).",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        out += [up, build]
        for section, wanted in ((self._banks, self.banks), (self._tenants, self.tenants),
                                (self._sessions, self.sessions)):
            if wanted:
                try:
                    out += section()
                except Exception:   # noqa: BLE001 - a malformed reply: skip that section
                    log.exception("metrics scrape: a section failed")
        errors = CounterMetricFamily("memoryd_scrape_errors", "Backend reads of a metrics "
                                     "scrape that raised (their series were skipped).",
                                     labels=["source"])
        with self._lock:
            for source, n in self._errors.items():
                errors.add_metric([source], n)
        took = GaugeMetricFamily("memoryd_scrape_duration_seconds",
                                 "Seconds the last scrape took to read the backend.")
        took.add_metric([], time.perf_counter() - t0)
        return out + [errors, took]

    def _banks(self) -> list:
        infos = self._read("list_banks", lambda: self.backend.list_banks(caller=None))
        if infos is None:
            return []
        base = ["bank", "tenant", "kind"]
        info_f = GaugeMetricFamily("memoryd_bank_info", "One per bank (value 1); tier is its "
                                   "tier setting.", labels=base + ["tier", "index", "metric",
                                                                   "eviction"])
        used = GaugeMetricFamily("memoryd_bank_used_bytes", "Bytes a bank is charged against "
                                 "its quotas (BankInfo.used_bytes).", labels=base)
        tier = GaugeMetricFamily("memoryd_bank_tier_bytes", "Where a bank's bytes sit "
                                 "(tier: ram, gpu; disk: its files, not part of used bytes).",
                                 labels=base + ["tier"])
        items = GaugeMetricFamily("memoryd_bank_items", "Rows in a bank.", labels=base)
        quota = GaugeMetricFamily("memoryd_bank_quota_bytes", "A bank's quota (absent: "
                                  "unlimited).", labels=base)
        frozen = GaugeMetricFamily("memoryd_bank_frozen", "1 if a bank is frozen.", labels=base)
        for b in infos:
            if b.spec.kind == "session" and not self.session_banks:
                continue
            lv = _labels(b)
            s = b.spec
            info_f.add_metric(lv + [str(s.tier), str(s.index), str(s.metric), str(s.eviction)], 1)
            used.add_metric(lv, b.used_bytes)
            for where, n in sorted((b.tier_bytes or {}).items()):
                tier.add_metric(lv + [str(where)], n)
            items.add_metric(lv, b.count)
            if s.quota_bytes is not None:
                quota.add_metric(lv, s.quota_bytes)
            frozen.add_metric(lv, 1 if b.frozen else 0)
        return [info_f, used, tier, items, quota, frozen]

    def _tenants(self) -> list:
        infos = self._read("list_tenants", lambda: self.backend.list_tenants(caller=None))
        if infos is None:
            return []
        used = GaugeMetricFamily("memoryd_tenant_used_bytes", "Bytes of all of a tenant's "
                                 "banks and sessions.", labels=["tenant"])
        quota = GaugeMetricFamily("memoryd_tenant_quota_bytes", "A tenant's quota (absent: "
                                  "unlimited).", labels=["tenant"])
        banks = GaugeMetricFamily("memoryd_tenant_banks", "A tenant's banks.", labels=["tenant"])
        for t in infos:
            used.add_metric([str(t.name)], t.used_bytes)
            if t.quota_bytes is not None:
                quota.add_metric([str(t.name)], t.quota_bytes)
            banks.add_metric([str(t.name)], t.banks)
        return [used, quota, banks]

    def _sessions(self) -> list:
        infos = self._read("list_sessions", lambda: self.backend.list_sessions(caller=None))
        if infos is None:
            return []
        open_, nbytes, items = defaultdict(int), defaultdict(int), defaultdict(int)
        for s in infos:
            open_[s.tenant] += 1
            nbytes[s.tenant] += s.bank.used_bytes
            items[s.tenant] += s.bank.count
        fams = [GaugeMetricFamily("memoryd_sessions_open", "Open sessions.", labels=["tenant"]),
                GaugeMetricFamily("memoryd_session_used_bytes", "Bytes of a tenant's session "
                                  "banks.", labels=["tenant"]),
                GaugeMetricFamily("memoryd_session_items", "Rows in a tenant's session banks.",
                                  labels=["tenant"])]
        for fam, values in zip(fams, (open_, nbytes, items)):
            for tenant, v in sorted(values.items()):
                fam.add_metric([str(tenant)], v)
        return fams


# ---- per-RPC metrics: a server interceptor ---------------------------------------------

def _split(method: str) -> tuple[str, str]:
    """'/memoryd.v1.Memory/Add' -> ('memoryd.v1.Memory', 'Add')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _code_name(context, failed: bool) -> str:
    """The status the call ended with: the one its handler set or aborted with;
    else CANCELLED if the client went away, UNKNOWN for an unmapped exception
    (what gRPC answers then), OK for a normal return."""
    code = None
    getter = getattr(context, "code", None)
    if callable(getter):
        try:
            code = getter()
        except Exception:   # noqa: BLE001 - an older grpcio without code()
            code = None
    if code is not None:
        return getattr(code, "name", str(code))
    try:
        active = context.is_active()
    except Exception:   # noqa: BLE001
        active = True
    if not active:
        return "CANCELLED"
    return "UNKNOWN" if failed else "OK"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every RPC and counts it by method and final status code (module doc)."""

    def __init__(self, registry: CollectorRegistry, *,
                 exclude: Iterable[str] = EXCLUDED_SERVICES):
        self.exclude = frozenset(exclude)
        labels = ["service", "method"]
        self.requests = Counter("memoryd_rpc_requests", "Finished RPCs by method and gRPC "
                                "status code.", labels + ["code"], registry=registry)
        self.errors = Counter("memoryd_rpc_errors", "Finished RPCs whose status code is not "
                              "OK.", labels + ["code"], registry=registry)
        self.seconds = Histogram("memoryd_rpc_duration_seconds", "RPC latency: call start "
                                 "until the reply (a stream's last message) is handed over.",
                                 labels, buckets=telemetry.LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("memoryd_rpc_in_flight", "RPCs being handled.", labels,
                               registry=registry)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        if service in self.exclude:
            return handler
        return self._wrap(handler, service, method)

    def _record(self, service: str, method: str, t0: float, code: str) -> None:
        self.seconds.labels(service, method).observe(time.perf_counter() - t0)
        self.requests.labels(service, method, code).inc()
        if code != "OK":
            self.errors.labels(service, method, code).inc()
        self.in_flight.labels(service, method).dec()

    def _wrap(self, handler: grpc.RpcMethodHandler, service: str, method: str):
        record = self._record
        in_flight = self.in_flight.labels(service, method)

        def unary_reply(behavior):
            def call(request, context):
                t0, failed = time.perf_counter(), True
                in_flight.inc()
                try:
                    reply = behavior(request, context)
                    failed = False
                    return reply
                finally:
                    record(service, method, t0, _code_name(context, failed))
            return call

        def streamed_reply(behavior):
            def call(request, context):
                t0, failed = time.perf_counter(), True
                in_flight.inc()
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:      # the end of the stream, an abort, or a close (GeneratorExit)
                    record(service, method, t0, _code_name(context, failed))
            return call

        if handler.unary_unary is not None:
            make, behavior, wrap = grpc.unary_unary_rpc_method_handler, handler.unary_unary, \
                unary_reply
        elif handler.unary_stream is not None:
            make, behavior, wrap = grpc.unary_stream_rpc_method_handler, handler.unary_stream, \
                streamed_reply
        elif handler.stream_unary is not None:
            make, behavior, wrap = grpc.stream_unary_rpc_method_handler, handler.stream_unary, \
                unary_reply
        elif handler.stream_stream is not None:
            make, behavior, wrap = grpc.stream_stream_rpc_method_handler, \
                handler.stream_stream, streamed_reply
        else:
            return handler
        return make(wrap(behavior), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def metrics_interceptor(registry: CollectorRegistry, **kwargs: Any) -> MetricsInterceptor:
    """A grpc.ServerInterceptor that records memoryd_rpc_* into registry
    (pass it in create_server(..., interceptors=[...]))."""
    return MetricsInterceptor(registry, **kwargs)


# ---- the endpoint -----------------------------------------------------------------------

class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (the daemon's stderr is its JSON log)."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def start_metrics(listen: str, backend: MemoryBackend | None, *, banks: bool = True,
                  tenants: bool = True, sessions: bool = True, session_banks: bool = False,
                  registry: CollectorRegistry | None = None
                  ) -> tuple[Callable[[], None], str]:
    """Serve GET /metrics (any path) on listen ('HOST:PORT'; port 0 picks one)
    from a daemon thread; (stop, 'host:port' bound). The registry (default: a
    new_registry()) gets a BackendCollector of backend (None: only memoryd_up,
    memoryd_build_info and the scrape series).
    MetricsListenError for a bad address; OSError if it cannot bind."""
    host, port = parse_listen(listen)
    registry = registry if registry is not None else new_registry()
    registry.register(BackendCollector(backend, banks=banks, tenants=tenants,
                                       sessions=sessions, session_banks=session_banks))

    class Server(exposition.ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, exposition.make_wsgi_app(registry), Server,
                        handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="memoryd-metrics", daemon=True)
    thread.start()
    bound_port = httpd.server_port
    shown = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    return stop, shown
