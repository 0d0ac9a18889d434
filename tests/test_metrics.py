"""Prometheus metrics (memoryd.daemon.metrics, memoryd.telemetry): a real
in-process server with its metrics endpoint, scraped over HTTP; the
`memoryd serve --metrics-listen` process; the Grafana dashboard's names."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from knnlayer.client import MemoryClient
from memoryd import __version__, errors, telemetry
from memoryd.api import BankSpec, SessionSpec
from memoryd.daemon import config as cfg
from memoryd.daemon import metrics
from memoryd.daemon.server import create_server
from memoryd.engine import LocalMemory

from conftest import unique_name

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "memoryd-dashboard.json"
SERVICE = "memoryd.v1.Memory"
RNG = np.random.default_rng(11)
DIM, VDIM = 8, 4


def rand(n: int, d: int) -> np.ndarray:
    return RNG.standard_normal((n, d)).astype(np.float32)


class Scrape:
    """One scrape: its families by name and a lookup of sample values."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str) -> list:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, default=None, **labels):
        """The value of the one sample `name` whose labels include `labels`."""
        found = [s.value for s in self.samples(name)
                 if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else default

    def names(self) -> set[str]:
        """Every series name this endpoint exports, also for families without samples yet."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}
        out = {s.name for f in self.families.values() for s in f.samples}
        for f in self.families.values():
            out.update(f.name + sfx for sfx in suffixes.get(f.type, ("",)))
        return out


def scrape(where: str) -> Scrape:
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as r:
        assert r.status == 200
        return Scrape(r.read().decode())


class SlowExport:
    """The backend, with an export whose chunks come 0.1 s apart (a streamed reply)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def export(self, bank, chunk_rows=65536, *, caller=None):
        for i, chunk in enumerate(self._inner.export(bank, chunk_rows, caller=caller)):
            if i:
                time.sleep(0.1)
            yield chunk


@pytest.fixture(scope="module")
def served():
    """(backend, grpc address, metrics 'host:port') of one in-process server."""
    d = Path(tempfile.mkdtemp(prefix="mdm-"))
    backend = LocalMemory(d / "data")
    wrapped = SlowExport(backend)
    registry = metrics.new_registry()
    server, address = create_server(wrapped, f"unix://{d}/m.sock",
                                    interceptors=[metrics.metrics_interceptor(registry)])
    stop, where = metrics.start_metrics("127.0.0.1:0", wrapped, registry=registry)
    try:
        yield backend, address, where
    finally:
        stop()
        server.stop(0).wait(10)
        backend.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def client(served):
    with MemoryClient(served[1]) as c:
        yield c


def rpc(s: Scrape, method: str, code: str | None = None, what: str = "requests") -> float:
    labels = {"service": SERVICE, "method": method}
    if code is not None:
        labels["code"] = code
    return s.value(f"memoryd_rpc_{what}_total", 0.0, **labels)


def test_bank_gauges_and_rpc_counts(served, client):
    _, _, where = served
    name, capped = unique_name("m"), unique_name("q")
    client.create_bank(BankSpec(name, dim=DIM, value_dim=VDIM))
    client.create_bank(BankSpec(capped, dim=DIM, quota_bytes=1 << 20))
    client.add(name, rand(12, DIM), rand(12, VDIM))
    searches = 3
    for _ in range(searches):
        client.search(name, rand(2, DIM), 4)
    before = scrape(where)
    gets = 4
    for _ in range(gets):
        client.bank_info(name)
    with pytest.raises(errors.NotFound):
        client.bank_info("no-such-bank")
    with pytest.raises(errors.NotFound):                 # a streamed reply that aborts
        client.get("no-such-bank", np.arange(3))
    with pytest.raises(errors.NotFound):                 # a client stream that aborts
        client.add("no-such-bank", rand(2, DIM))
    client.freeze_bank(capped)
    info, qinfo = client.bank_info(name), client.bank_info(capped)
    s = scrape(where)

    labels = {"bank": name, "tenant": "default", "kind": "domain"}
    assert s.value("memoryd_bank_used_bytes", **labels) == info.used_bytes > 0
    assert s.value("memoryd_bank_items", **labels) == info.count == 12
    for tier, n in info.tier_bytes.items():
        assert s.value("memoryd_bank_tier_bytes", tier=tier, **labels) == n
    assert s.value("memoryd_bank_tier_bytes", tier="ram", **labels) > 0
    assert s.value("memoryd_bank_frozen", **labels) == 0
    assert s.value("memoryd_bank_info", tier="ram", index="Flat", metric="l2",
                   eviction="reject", **labels) == 1
    # unlimited: no quota series; a quota: its bytes
    assert s.value("memoryd_bank_quota_bytes", bank=name) is None
    assert s.value("memoryd_bank_quota_bytes", bank=capped) == 1 << 20
    assert s.value("memoryd_bank_frozen", bank=capped) == 1 and qinfo.frozen

    tenant = client.tenant_info("default")
    assert s.value("memoryd_tenant_used_bytes", tenant="default") == tenant.used_bytes
    assert s.value("memoryd_tenant_banks", tenant="default") == tenant.banks

    # per RPC: OK and NOT_FOUND by method, latency counts = calls made
    assert rpc(s, "CreateBank", "OK") >= 2
    assert rpc(s, "GetBank", "NOT_FOUND") - rpc(before, "GetBank", "NOT_FOUND") == 1
    assert rpc(s, "GetBank", "NOT_FOUND", "errors") - \
        rpc(before, "GetBank", "NOT_FOUND", "errors") == 1
    assert rpc(s, "Get", "NOT_FOUND", "errors") == 1
    assert rpc(s, "Add", "NOT_FOUND", "errors") == 1
    assert rpc(s, "GetBank", "OK", "errors") == 0       # errors never count OK
    assert s.value("memoryd_rpc_errors_total", method="Search", code="OK") is None

    def count(sc, method):
        return sc.value("memoryd_rpc_duration_seconds_count", 0.0, service=SERVICE,
                        method=method)
    assert count(s, "GetBank") - count(before, "GetBank") == gets + 1 + 2   # + the two infos
    assert count(before, "Search") + count(before, "SearchOne") == searches
    assert count(s, "Search") + count(s, "SearchOne") == searches
    assert sum(rpc(s, m, "OK") for m in ("Search", "SearchOne")) == searches
    # health is not counted; nothing is in flight between calls
    assert not any(x.labels["service"].startswith("grpc.") for x in
                   s.samples("memoryd_rpc_requests_total"))
    assert all(x.value == 0 for x in s.samples("memoryd_rpc_in_flight"))
    # buckets from 0.1 ms to 10 s
    les = {x.labels["le"] for x in s.samples("memoryd_rpc_duration_seconds_bucket")}
    assert {"0.0001", "10.0", "+Inf"} <= les

    assert s.value("memoryd_up") == 1
    assert s.value("memoryd_build_info", version=__version__) == 1
    assert s.value("memoryd_scrape_errors_total", source="list_banks") == 0
    assert s.samples("process_cpu_seconds_total") or s.samples("python_info")


def test_streamed_reply_timed_until_its_end(served, client):
    _, _, where = served
    name = unique_name("x")
    client.create_bank(BankSpec(name, dim=DIM))
    client.add(name, rand(30, DIM))
    before = scrape(where)
    chunks = list(client.export(name, chunk_rows=10))       # 3 chunks, 0.1 s apart
    assert sum(len(c.ids) for c in chunks) == 30
    s = scrape(where)

    def took(sc, what):
        return sc.value(f"memoryd_rpc_duration_seconds_{what}", 0.0, service=SERVICE,
                        method="Export")
    assert took(s, "count") - took(before, "count") == 1
    assert took(s, "sum") - took(before, "sum") >= 0.19
    assert rpc(s, "Export", "OK") - rpc(before, "Export", "OK") == 1


def test_fifo_evictions_counted(served, client):
    _, _, where = served
    name = unique_name("f")
    client.create_bank(BankSpec(name, dim=DIM, value_dim=VDIM, eviction="fifo"))
    client.add(name, rand(20, DIM), rand(20, VDIM))
    client.set_quota(name, client.bank_info(name).used_bytes)     # full to the byte
    client.add(name, rand(5, DIM), rand(5, VDIM))                 # evicts in the add (_reserve)
    after_add = client.bank_info(name).count
    s1 = scrape(where)
    by_add = s1.value("memoryd_evicted_rows_total", bank=name, tenant="default")
    assert by_add == 25 - after_add >= 5

    info = client.bank_info(name)
    client.set_quota(name, info.used_bytes * 3 // 4)              # evicts (_evict_oldest)
    final = client.bank_info(name).count
    assert final < after_add
    s2 = scrape(where)
    assert s2.value("memoryd_evicted_rows_total", bank=name, tenant="default") == 25 - final
    assert s2.value("memoryd_bank_items", bank=name) == final
    assert s2.value("memoryd_bank_quota_bytes", bank=name) == info.used_bytes * 3 // 4


def test_sessions_and_tenant_quota(served, client):
    backend, _, where = served
    tenant = unique_name("t")
    client.set_tenant_quota(tenant, 10 << 20)
    sessions = [client.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=tenant))
                for _ in range(2)]
    client.append(sessions[0].session_id, rand(3, DIM), rand(3, VDIM))
    s = scrape(where)
    assert s.value("memoryd_sessions_open", tenant=tenant) == 2
    assert s.value("memoryd_session_items", tenant=tenant) == 3
    assert s.value("memoryd_session_used_bytes", tenant=tenant) == \
        sum(client.session_info(x.session_id).bank.used_bytes for x in sessions)
    assert s.value("memoryd_tenant_quota_bytes", tenant=tenant) == 10 << 20
    assert s.value("memoryd_tenant_used_bytes", tenant=tenant) == \
        client.tenant_info(tenant).used_bytes
    # session banks stay out of the per-bank series
    assert not [x for x in s.samples("memoryd_bank_items") if x.labels["kind"] == "session"]
    client.close_session(sessions[1].session_id)
    assert scrape(where).value("memoryd_sessions_open", tenant=tenant) == 1


def test_wal_and_checkpoints(served, client):
    _, _, where = served
    name = unique_name("w")
    client.create_bank(BankSpec(name, dim=DIM))
    before = scrape(where)
    client.add(name, rand(4, DIM), ack="durable")
    client.freeze_bank(name)                                     # checkpoints
    s = scrape(where)
    for series in ("memoryd_wal_bytes_total", "memoryd_wal_records_total",
                   "memoryd_wal_fsyncs_total", "memoryd_checkpoint_duration_seconds_count"):
        assert s.value(series) > before.value(series, 0.0), series
    assert s.value("memoryd_wal_bytes_total") - before.value("memoryd_wal_bytes_total") \
        >= 4 * DIM * 4


class Broken:
    """A backend whose bank and session listings raise."""

    def list_banks(self, tenant=None, *, caller=None):
        raise RuntimeError("shard 3 is down")

    def list_tenants(self, *, caller=None):
        return []

    def list_sessions(self, tenant=None, *, caller=None):
        raise errors.Unavailable("no")


def test_scrape_survives_a_failing_backend():
    stop, where = metrics.start_metrics("127.0.0.1:0", Broken())
    try:
        s = scrape(where)                            # 200 (scrape() checks it)
        assert s.value("memoryd_scrape_errors_total", source="list_banks") == 1
        assert s.value("memoryd_scrape_errors_total", source="list_sessions") == 1
        assert s.value("memoryd_scrape_errors_total", source="list_tenants") == 0
        assert s.value("memoryd_up") == 1
        assert not s.samples("memoryd_bank_items")
        assert scrape(where).value("memoryd_scrape_errors_total", source="list_banks") == 2
    finally:
        stop()


def test_router_mode_and_fanout():
    shard = unique_name("shard")
    telemetry.observe_fanout(shard, "Search", 0.002, True)
    telemetry.observe_fanout(shard, "Search", 0.2, False)
    with LocalMemory(Path(tempfile.mkdtemp(prefix="mdr-")) / "d") as backend:
        backend.create_bank(BankSpec("r", dim=DIM))
        stop, where = metrics.start_metrics("127.0.0.1:0", backend, banks=False)
        try:
            s = scrape(where)
        finally:
            stop()
    assert not s.samples("memoryd_bank_items")               # a router: no per-bank series
    assert s.value("memoryd_tenant_banks", tenant="default") == 1
    assert s.value("memoryd_fanout_duration_seconds_count", shard=shard, method="Search") == 2
    assert s.value("memoryd_fanout_requests_total", shard=shard, method="Search",
                   result="error") == 1
    assert s.value("memoryd_fanout_requests_total", shard=shard, method="Search",
                   result="ok") == 1
    stop, where = metrics.start_metrics("127.0.0.1:0", None, banks=False)   # no backend at all
    try:
        s = scrape(where)
    finally:
        stop()
    assert s.value("memoryd_up") == 1 and s.value("memoryd_build_info", version=__version__) == 1
    assert s.value("memoryd_fanout_duration_seconds_count", shard=shard, method="Search") == 2
    assert not s.samples("memoryd_tenant_banks")


def test_metrics_listen_config():
    assert cfg.load(data_dir="/tmp/x", env={}).metrics_listen is None
    assert cfg.load(data_dir="/tmp/x", env={"MEMORYD_METRICS_LISTEN": ":0"}).metrics_listen == ":0"
    assert cfg.load(data_dir="/tmp/x", env={"MEMORYD_METRICS_LISTEN": ":1"},
                    metrics_listen="off").metrics_listen is None
    with pytest.raises(cfg.ConfigError, match="HOST:PORT"):
        cfg.load(data_dir="/tmp/x", env={}, metrics_listen="localhost")
    assert metrics.parse_listen(":0") == ("0.0.0.0", 0)
    assert metrics.parse_listen("[::1]:9464") == ("::1", 9464)
    with pytest.raises(metrics.MetricsListenError):
        metrics.parse_listen("127.0.0.1:http")


def test_serve_metrics_listen(tmp_path):
    from daemon_util import daemon_log, start_daemon, stop_daemon

    short = Path(tempfile.mkdtemp(prefix="mds-"))
    proc, address = start_daemon(short / "d", "--metrics-listen", "127.0.0.1:0")
    try:
        where = None
        deadline = time.monotonic() + 10
        while where is None and time.monotonic() < deadline:
            for line in daemon_log(proc).splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("msg") == "memoryd started":
                    where = entry["fields"]["metrics"]
            time.sleep(0.05)
        assert where and re.fullmatch(r"127\.0\.0\.1:\d+", where) and not where.endswith(":0")
        with MemoryClient(address) as c:
            c.create_bank(BankSpec("p", dim=DIM))
            c.add("p", rand(3, DIM))
        s = scrape(where)
        assert s.value("memoryd_up") == 1
        assert s.value("memoryd_bank_items", bank="p") == 3
        assert rpc(s, "Add", "OK") == 1
    finally:
        assert stop_daemon(proc) == 0
        shutil.rmtree(short, ignore_errors=True)


def _exprs(dashboard: dict) -> list[str]:
    out = []

    def walk(panels):
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))
    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        q = var.get("query")
        out.append(q["query"] if isinstance(q, dict) else str(q or ""))
    return out


def test_grafana_dashboard_names_are_exported(served, client):
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"bank", "instance"} <= set(variables)
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "p50", "p99", "error rate", "bytes by tier", "items",
                  "quota use", "sessions", "evictions", "wal", "checkpoint", "fan-out"):
        assert topic in titles, topic

    exported = scrape(served[2]).names()
    used = {n for e in _exprs(dashboard) for n in re.findall(r"\bmemoryd_[A-Za-z0-9_:]+", e)}
    assert len(used) >= 20
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries series the endpoint does not export: {missing}"
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
