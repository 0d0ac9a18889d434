#!/usr/bin/env python
"""Crash loop: kill a busy `memoryd serve` again and again, check what survives.

    python tests/crash_loop.py --kills 200 --seed 1          # the long version
    python tests/crash_loop.py --help

One daemon on one data dir. Each round, N writer threads (each its own
MemoryClient) issue a random mix of writes, every call with ack "applied" or
"durable" at random:

    add              explicit ids (a unique id space per writer) into
                     flat3 (Flat, 3 shards), hnsw2 (HNSW16, 2 shards),
                     f16 (Flat, float16 values)
    add (fifo)       assigned ids into fifo (eviction="fifo", a small quota, born on
                     the mmap tier)
    append           rows with scores into the writer's own session
    promote          promote_session(session, target, min_score=..., move=True) into
                     promo (Flat, 2 shards) or, for at most 200 rows, into fifo
                     (where the add evicts)
    update / remove  random ids the writer owns (flat3, hnsw2, f16, promo)
    set_tier         (writer 0 only) flat3/hnsw2/f16/fifo to "mmap" and back to "ram"

Each writer owns its ids and its session, so the model is exact: one request
in flight per writer at most, and no two writers touch the same row.

The parent records every acknowledged result (the exact arrays sent, the ids
returned) and every request in flight. The daemon is killed with SIGKILL at a
random moment (0.05 .. --max-delay s after the writers start) or, in about
--fault-rate of the rounds, started with MEMORYD_CRASH_AT=<fault point> so it
dies inside that step (os._exit(70); each point in turn, the writers leaning
towards the op that reaches it); sometimes (--recovery-rate) the restart
after a kill is itself armed with a fault point and dies inside recovery.
It is then restarted on the same data dir and checked:

  * every acknowledged write is there byte for byte (SIGKILL keeps the page
    cache, so "applied" acks must survive as well as "durable" ones): rows
    with their keys and values, updated values, removed ids gone, session
    rows with their scores (read back exactly by copy-promotes into a scratch
    bank at min_score = v and nextafter(v) for each score value used);
  * every request in flight is all there or not there (an add: all its ids or
    none; an update: all new values or all old; a remove: all gone or all
    present; a promote with move: moved entirely or not at all; set_tier: the
    old tier or the new one);
  * no phantom ids, no duplicate ids, and every row that came from a session
    is in exactly one place (the session or the target bank);
  * usage equals contents: bank_info(b).count == exported rows, and
    bank_info(b).used_bytes == that of a fresh twin bank given the same rows;
    tenant_info("default").used_bytes == the sum over the banks;
  * searches: present keys of the Flat banks come back as themselves at
    distance 0 (with their values); removed or evicted keys never come back;
    no search returns an id the bank does not hold;
  * fifo (eviction makes exact prediction hard): whatever is present is
    byte-identical to something written, ids are unique and never come back,
    what is present is a suffix of everything written (fifo evicts the
    oldest), the newest acknowledged batch is present, and usage <= quota.

Each violation names the round, the op and what differs. `run(...)` is what
tests/test_crash_loop.py calls; it returns a Summary.
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent
for p in (str(TESTS), str(TESTS.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

from daemon_util import daemon_env, serve_args, stop_daemon  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402
from memoryd import faults  # noqa: E402
from memoryd.api import BankSpec, SessionSpec  # noqa: E402
from memoryd.daemon.server import wait_serving  # noqa: E402

DIM, VDIM = 8, 4
FLAT, HNSW, F16, FIFO, PROMO = "flat3", "hnsw2", "f16", "fifo", "promo"
EXPLICIT = (FLAT, HNSW, F16)                 # adds bring their own ids
OWNED = (FLAT, HNSW, F16, PROMO)             # updates/removes pick owned ids here
TIERED = (FLAT, HNSW, F16, FIFO)             # writer 0 moves these between ram and mmap
FLAT_BANKS = (FLAT, F16, PROMO, FIFO)        # exact search: a stored key is found at distance 0
FIFO_ROWS = 1000                             # the fifo bank's quota, in rows
FIFO_PROMOTE_MAX = 200                       # promotes of at most this many rows may go to fifo
ROW_BYTES = 8 + 4 * DIM + 4 * VDIM           # a Flat float32 domain row: id, key, value
SCORES = np.array([0.25, 1.5, 2.75, 4.0], np.float32)   # session scores (read back exactly)
ID_SHIFT = 40                                # writer w's explicit ids: (w + 1) << 40 ...
FAULT_POINTS = ("bank.write:logged", "bank.add:between-shards", "bank.checkpoint:files-written",
                "promote:selected", "promote:added")
RECOVERY_POINTS = ("bank.checkpoint:files-written", "bank.write:logged")


def bank_specs() -> list[BankSpec]:
    return [
        BankSpec(FLAT, dim=DIM, value_dim=VDIM, shards=3),
        BankSpec(HNSW, dim=DIM, value_dim=VDIM, index="HNSW16", shards=2),
        BankSpec(F16, dim=DIM, value_dim=VDIM, value_dtype="float16"),
        BankSpec(FIFO, dim=DIM, value_dim=VDIM, eviction="fifo", quota_bytes=FIFO_ROWS * ROW_BYTES,
                 tier="mmap"),           # born on mmap (writer 0 moves it to ram and back)
        BankSpec(PROMO, dim=DIM, value_dim=VDIM, shards=2),
    ]


def value_dtype(bank: str) -> np.dtype:
    return np.dtype(np.float16 if bank == F16 else np.float32)


# ---- daemon ---------------------------------------------------------------------

def start(data_dir: Path, crash_at: str | None = None, timeout: float = 60.0
          ) -> tuple[subprocess.Popen, str]:
    """daemon_util.start_daemon, with MEMORYD_CRASH_AT set when crash_at is given.
    RuntimeError (with the log) if the daemon exits while starting."""
    address = f"unix://{data_dir.resolve() / 'memoryd.sock'}"
    log_path = data_dir.parent / f"{data_dir.name}.{time.monotonic_ns()}.log"
    env = daemon_env()
    if crash_at:
        env["MEMORYD_CRASH_AT"] = crash_at
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_args(data_dir, "--grace", "5"), stdout=log, stderr=log, env=env)
    proc.log_path = log_path  # type: ignore[attr-defined]
    try:
        wait_serving(address, timeout=timeout, proc=proc)
    except RuntimeError as e:
        raise DaemonExited(proc, f"{e}") from None
    except TimeoutError:
        proc.kill()
        proc.wait(10)
        raise
    return proc, address


class DaemonExited(RuntimeError):
    def __init__(self, proc: subprocess.Popen, msg: str):
        self.proc, self.rc = proc, proc.returncode
        super().__init__(msg)


def log_tail(proc: subprocess.Popen, n: int = 4000) -> str:
    try:
        return Path(proc.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]
    except OSError:
        return ""


# ---- the model ------------------------------------------------------------------

@dataclass
class Op:
    """One write as issued: everything needed to recognise it after a crash."""

    kind: str                      # add | fifo_add | append | promote | update | remove | set_tier
    writer: int
    round: int
    no: int
    bank: str
    ack: str
    ids: np.ndarray | None = None          # add: the ids sent; update/remove: the ids named
    keys: np.ndarray | None = None
    values: np.ndarray | None = None       # add/append: sent; update: the new values
    old: np.ndarray | None = None          # update: the values before
    scores: np.ndarray | None = None       # append
    min_score: float | None = None         # promote
    target: str = PROMO                    # promote: promo, or fifo (evicting as it adds)
    selected: dict | None = None           # promote: session id -> (key, value, score) that should move
    tier: str | None = None                # set_tier: the new tier
    old_tier: str | None = None
    error: str = ""

    def describe(self) -> str:
        n = (len(self.keys) if self.keys is not None else len(self.ids) if self.ids is not None
             else len(self.selected) if self.selected is not None else 0)
        extra = (f" -> {self.target} min_score={self.min_score}" if self.kind == "promote" else
                 f" {self.old_tier}->{self.tier}" if self.kind == "set_tier" else "")
        return f"w{self.writer}#{self.no} {self.kind} {self.bank} n={n} ack={self.ack}{extra}"


@dataclass
class Summary:
    kills: int = 0
    sigkills: int = 0
    fault_kills: dict = field(default_factory=dict)       # point -> times it killed the daemon
    fault_untripped: int = 0                              # armed rounds ended by SIGKILL instead
    recovery_kills: int = 0                               # restarts that died inside recovery
    clean_stops: int = 0
    acked: dict = field(default_factory=dict)             # kind -> acknowledged ops
    acked_levels: dict = field(default_factory=lambda: {"applied": 0, "durable": 0})
    inflight_all: int = 0
    inflight_none: int = 0
    inflight_partial_fifo: int = 0
    inflight_kinds: dict = field(default_factory=dict)    # kind -> [all, none]
    moves_finished: int = 0                               # promotes recovery had to finish
    rows_checked: int = 0
    searches_checked: int = 0
    rounds: int = 0
    seconds: float = 0.0
    violations: list = field(default_factory=list)
    data_dir: str = ""

    @property
    def acked_total(self) -> int:
        return sum(self.acked.values())

    def line(self) -> str:
        faults_s = ", ".join(f"{k} x{v}" for k, v in sorted(self.fault_kills.items())) or "none"
        return (f"crash_loop: {self.kills} kills ({self.sigkills} SIGKILL, "
                f"{sum(self.fault_kills.values())} fault points [{faults_s}], "
                f"{self.recovery_kills} in recovery), {self.acked_total} acknowledged ops checked "
                f"(applied {self.acked_levels['applied']}, durable {self.acked_levels['durable']}), "
                f"in-flight all/none {self.inflight_all}/{self.inflight_none}"
                + (f" (+{self.inflight_partial_fifo} fifo partly evicted)" if self.inflight_partial_fifo else "")
                + f" [{', '.join(f'{k} {a}/{n}' for k, (a, n) in sorted(self.inflight_kinds.items()))}]"
                + f", {self.moves_finished} moves finished by recovery"
                + f", {self.rows_checked} row checks, {self.searches_checked} search checks, "
                f"{len(self.violations)} violations, {self.seconds:.1f} s")


class Model:
    """What the daemon must hold: per bank id -> (key, value); per session id ->
    (key, value, score); tiers; the requests in flight (one per writer at most)."""

    def __init__(self, writers: int):
        self.lock = threading.Lock()
        self.banks: dict[str, dict[int, tuple]] = {b: {} for b in (FLAT, HNSW, F16, PROMO)}
        self.removed: dict[str, dict[int, np.ndarray]] = {b: {} for b in (FLAT, HNSW, F16, PROMO)}
        self.fifo: dict[int, tuple] = {}                 # rows that may still be present
        self.fifo_gone: dict[int, np.ndarray] = {}       # evicted ids -> key (sampled in checks)
        self.fifo_newest: np.ndarray | None = None       # the acknowledged batch with the highest ids
        self.fifo_ever: set[int] = set()
        self.sessions: list[str] = []                    # writer w's session: sessions[w]
        self.srows: dict[str, dict[int, tuple]] = {}
        self.sever: dict[str, set] = {}                  # every id a session ever handed out
        self.tiers = {b: "mmap" if b == FIFO else "ram" for b in TIERED}
        self.owned = [{b: set() for b in OWNED} for _ in range(writers)]
        self.promo_owner: dict[int, int] = {}
        self.next_id = [((w + 1) << ID_SHIFT) for w in range(writers)]
        self.inflight: dict[int, Op] = {}
        self.reported_dups: set[bytes] = set()          # rows already reported in two places

    def own(self, w: int, bank: str, ids) -> None:
        self.owned[w][bank].update(int(i) for i in ids)

    def disown(self, bank: str, ids) -> None:
        for i in ids:
            i = int(i)
            w = (i >> ID_SHIFT) - 1 if bank != PROMO else self.promo_owner.get(i, -1)
            if 0 <= w < len(self.owned):
                self.owned[w][bank].discard(i)


# ---- the writers ------------------------------------------------------------------

WEIGHTS = {"add": 30, "fifo_add": 8, "append": 20, "promote": 8, "update": 12, "remove": 10,
           "set_tier": 4}


class Round:
    """One round of writers against one daemon."""

    def __init__(self, loop: "CrashLoop", r: int, proc: subprocess.Popen, address: str,
                 point: str | None = None):
        self.loop, self.r, self.proc, self.address = loop, r, proc, address
        self.weights = dict(WEIGHTS)
        if point and point.startswith("promote:"):     # armed: make the step come soon
            self.weights["promote"] *= 4
        elif point == "bank.checkpoint:files-written":
            self.weights["set_tier"] *= 4
        self.kill_sent = threading.Event()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def died(self) -> bool:
        """Whether the daemon is dead (killed, or died at its fault point): the
        connection may drop a moment before the exit can be seen, so look for 2 s."""
        deadline = time.monotonic() + 2.0
        while True:
            if self.kill_sent.is_set() or self.proc.poll() is not None:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def run_writer(self, w: int) -> None:
        loop, m = self.loop, self.loop.model
        rng = np.random.default_rng([loop.seed, self.r, w])
        try:
            client = MemoryClient(self.address, timeout=60, wait_ready=10)
        except Exception as e:  # noqa: BLE001
            if not self.died():
                loop.violate(self.r, f"w{w}", f"could not connect: {e!r}")
            return
        try:
            no = 0
            while not self.stop.is_set():
                no += 1
                with m.lock:
                    op = self.pick(w, no, rng)
                    if op is None:
                        continue
                    m.inflight[w] = op
                try:
                    res = self.execute(client, op)
                except Exception as e:  # noqa: BLE001 - every failure is classified
                    op.error = f"{type(e).__name__}: {e}"[:300]
                    if not self.died():
                        loop.violate(self.r, op.describe(),
                                     f"failed while the daemon was alive: {op.error}")
                    return           # the op stays in flight: checked all-or-nothing
                with m.lock:
                    del m.inflight[w]
                    self.acknowledge(op, res)
        finally:
            client.close()

    # -- choosing an op (under the model lock)
    def pick(self, w: int, no: int, rng: np.random.Generator) -> Op | None:
        m = self.loop.model
        kinds = [k for k in self.weights if k != "set_tier" or w == 0]
        p = np.array([self.weights[k] for k in kinds], float)
        kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
        ack = "durable" if rng.random() < 0.5 else "applied"
        n = int(rng.integers(5, 51))
        op = Op(kind=kind, writer=w, round=self.r, no=no, bank="", ack=ack)
        if kind in ("add", "fifo_add", "append"):
            op.keys = rng.standard_normal((n, DIM)).astype(np.float32)
        if kind == "add":
            op.bank = EXPLICIT[int(rng.integers(len(EXPLICIT)))]
            op.ids = np.arange(m.next_id[w], m.next_id[w] + n, dtype=np.int64)
            m.next_id[w] += n
            op.values = rng.standard_normal((n, VDIM)).astype(value_dtype(op.bank))
        elif kind == "fifo_add":
            op.bank = FIFO
            op.values = rng.standard_normal((n, VDIM)).astype(np.float32)
        elif kind == "append":
            op.bank = m.sessions[w]
            op.values = rng.standard_normal((n, VDIM)).astype(np.float32)
            op.scores = SCORES[rng.integers(len(SCORES), size=n)]
        elif kind == "promote":
            op.bank = m.sessions[w]
            op.min_score = float(SCORES[int(rng.integers(1, len(SCORES)))])
            op.selected = {i: row for i, row in m.srows[op.bank].items() if row[2] >= op.min_score}
            if len(op.selected) <= FIFO_PROMOTE_MAX and rng.random() < 0.5:
                op.target = FIFO
        elif kind in ("update", "remove"):
            banks = [b for b in OWNED if m.owned[w][b]]
            if not banks:
                return None
            op.bank = banks[int(rng.integers(len(banks)))]
            pool = sorted(m.owned[w][op.bank])
            k = min(len(pool), int(rng.integers(1, 21 if kind == "update" else 11)))
            op.ids = np.array(rng.choice(pool, size=k, replace=False), np.int64)
            if kind == "update":
                op.old = np.stack([m.banks[op.bank][int(i)][1] for i in op.ids])
                op.values = rng.standard_normal((k, VDIM)).astype(value_dtype(op.bank))
        elif kind == "set_tier":
            op.bank = TIERED[int(rng.integers(len(TIERED)))]
            op.old_tier = m.tiers[op.bank]
            op.tier = "mmap" if op.old_tier == "ram" else "ram"
        return op

    @staticmethod
    def execute(c: MemoryClient, op: Op) -> Any:
        if op.kind == "add":
            return c.add(op.bank, op.keys, op.values, ids=op.ids, ack=op.ack)
        if op.kind == "fifo_add":
            return c.add(op.bank, op.keys, op.values, ack=op.ack)
        if op.kind == "append":
            return c.append(op.bank, op.keys, op.values, scores=op.scores, ack=op.ack)
        if op.kind == "promote":
            return c.promote_session(op.bank, op.target, min_score=op.min_score, move=True, ack=op.ack)
        if op.kind == "update":
            return c.update_values(op.bank, op.ids, op.values, ack=op.ack)
        if op.kind == "remove":
            return c.remove(op.bank, op.ids, ack=op.ack)
        if op.kind == "set_tier":
            return c.set_tier(op.bank, op.tier)
        raise AssertionError(op.kind)

    # -- an acknowledged op enters the model (under the model lock)
    def acknowledge(self, op: Op, res: Any) -> None:
        loop, m = self.loop, self.loop.model
        s = loop.summary
        s.acked[op.kind] = s.acked.get(op.kind, 0) + 1
        s.acked_levels["durable" if op.kind in ("promote",) else op.ack] += op.kind != "set_tier"
        bad = lambda what: loop.violate(self.r, op.describe(), f"acknowledged reply wrong: {what}")  # noqa: E731
        if op.kind == "add":
            if not np.array_equal(res, op.ids):
                bad(f"ids {res[:5]}... != sent {op.ids[:5]}...")
            apply_add(m, op.bank, op.ids, op.keys, op.values, op.writer)
        elif op.kind == "fifo_add":
            ids = np.asarray(res, np.int64)
            if len(ids) != len(op.keys) or len(np.unique(ids)) != len(ids):
                bad(f"{len(ids)} ids for {len(op.keys)} rows (unique {len(np.unique(ids))})")
            fifo_acked(m, ids, op.keys, op.values, bad)
        elif op.kind == "append":
            ids = np.asarray(res, np.int64)
            if len(ids) != len(op.keys) or len(np.unique(ids)) != len(ids):
                bad(f"{len(ids)} ids for {len(op.keys)} rows")
            reused = [int(i) for i in ids if int(i) in m.sever[op.bank]]
            if reused:
                bad(f"session ids handed out again: {reused[:5]}")
            apply_append(m, op.bank, ids, op.keys, op.values, op.scores)
        elif op.kind == "promote":
            want = sorted(op.selected)
            got = sorted(int(i) for i in res.source_ids)
            if got != want or res.promoted != len(want) or len(res.target_ids) != len(want) or \
                    (want and not res.moved):
                bad(f"promoted {res.promoted}, source ids {got[:8]} (want {want[:8]}, "
                    f"{len(want)} rows), moved={res.moved}")
            if op.target == FIFO:
                rows = [op.selected[int(i)] for i in res.source_ids if int(i) in op.selected]
                if len(rows) == len(res.target_ids) and rows:
                    fifo_acked(m, np.asarray(res.target_ids, np.int64), [r[0] for r in rows],
                               [r[1] for r in rows], bad)
                for i in res.source_ids:
                    m.srows[op.bank].pop(int(i), None)
            else:
                apply_move(m, op.bank, op.writer, [int(i) for i in res.source_ids],
                           [int(i) for i in res.target_ids])
        elif op.kind == "update":
            if res != len(op.ids):
                bad(f"updated {res} of {len(op.ids)} ids")
            for i, v in zip(op.ids, op.values):
                m.banks[op.bank][int(i)] = (m.banks[op.bank][int(i)][0], v)
        elif op.kind == "remove":
            if res != len(op.ids):
                bad(f"removed {res} of {len(op.ids)} ids")
            apply_remove(m, op.bank, op.ids)
        elif op.kind == "set_tier":
            if res.spec.tier != op.tier:
                bad(f"tier {res.spec.tier}, asked {op.tier}")
            m.tiers[op.bank] = op.tier


def fifo_acked(m: Model, ids: np.ndarray, keys, values, bad) -> None:
    """Rows the fifo bank acknowledged (an add or a promote into it)."""
    reused = [int(i) for i in ids if int(i) in m.fifo_ever]
    if reused:
        bad(f"fifo ids handed out again: {reused[:5]}")
    for i, k, v in zip(ids, keys, values):
        m.fifo[int(i)] = (k, v)
        m.fifo_ever.add(int(i))
    if len(ids) and (m.fifo_newest is None or ids.max() > m.fifo_newest.max()):
        m.fifo_newest = ids.copy()


def apply_add(m: Model, bank: str, ids, keys, values, w: int) -> None:
    for i, k, v in zip(ids, keys, values):
        m.banks[bank][int(i)] = (k, v)
    m.own(w, bank, ids)


def apply_append(m: Model, sid: str, ids, keys, values, scores) -> None:
    for i, k, v, sc in zip(ids, keys, values, scores):
        m.srows[sid][int(i)] = (k, v, np.float32(sc))
        m.sever[sid].add(int(i))


def apply_move(m: Model, sid: str, w: int, source_ids: list[int], target_ids: list[int]) -> None:
    for si, ti in zip(source_ids, target_ids):
        k, v, _ = m.srows[sid].pop(si)
        m.banks[PROMO][ti] = (k, v)
        m.promo_owner[ti] = w
    m.own(w, PROMO, target_ids)


def apply_remove(m: Model, bank: str, ids) -> None:
    for i in ids:
        k, _ = m.banks[bank].pop(int(i))
        m.removed[bank][int(i)] = k
    m.disown(bank, ids)


# ---- the loop ---------------------------------------------------------------------

class CrashLoop:
    def __init__(self, data_dir: Path, *, kills: int, seed: int, writers: int = 4,
                 fault_rate: float = 0.25, recovery_rate: float = 0.1, max_delay: float = 1.5,
                 fault_wait: float = 3.0, keep_going: bool = False, verbose: bool = True):
        self.data_dir = Path(data_dir)
        self.kills, self.seed, self.writers = kills, seed, writers
        self.fault_rate, self.recovery_rate = fault_rate, recovery_rate
        self.max_delay, self.fault_wait = max_delay, fault_wait
        self.keep_going, self.verbose = keep_going, verbose
        self.rng = random.Random(seed)
        self.model = Model(writers)
        self.summary = Summary(data_dir=str(self.data_dir))
        self._vlock = threading.Lock()
        self.fault_queue: list[str] = []
        self.round_how = "set-up"           # how the current round's daemon died
        self.round_violations = 0

    def say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def violate(self, r: int, op: str, what: str) -> None:
        line = f"round {r} [{self.round_how}]: {op}: {what}"
        with self._vlock:
            self.summary.violations.append(line)
            self.round_violations += 1
        self.say("VIOLATION " + line)

    # -- set-up
    def setup(self) -> tuple[subprocess.Popen, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        proc, address = start(self.data_dir)
        with MemoryClient(address, timeout=60) as c:
            for spec in bank_specs():
                c.create_bank(spec)
            for _ in range(self.writers):
                sid = c.open_session(SessionSpec(dim=DIM, value_dim=VDIM, ttl_idle_s=10 ** 7)).session_id
                self.model.sessions.append(sid)
                self.model.srows[sid] = {}
                self.model.sever[sid] = set()
        return proc, address

    def run(self) -> Summary:
        t0 = time.monotonic()
        proc, address = self.setup()
        try:
            r = 0
            while self.summary.kills < self.kills:
                r += 1
                self.round_violations = 0
                proc, address = self.one_round(r, proc, address)
                self.summary.rounds = r
                if self.summary.violations and not self.keep_going:
                    break
        except Exception:  # noqa: BLE001 - a harness crash is reported, not hidden
            self.violate(self.summary.rounds + 1, "harness", "aborted:\n" + traceback.format_exc())
            proc = None  # type: ignore[assignment]
        finally:
            if proc is not None and proc.poll() is None:
                try:
                    code = stop_daemon(proc, timeout=30)
                    if code != 0:
                        self.violate(self.summary.rounds, "final SIGTERM", f"exit code {code}")
                except Exception as e:  # noqa: BLE001
                    self.violate(self.summary.rounds, "final SIGTERM", repr(e))
            self.summary.seconds = time.monotonic() - t0
        return self.summary

    def one_round(self, r: int, proc: subprocess.Popen, address: str) -> tuple[subprocess.Popen, str]:
        s = self.summary
        point = None
        if self.rng.random() < self.fault_rate:        # every point in turn, in a shuffled order
            if not self.fault_queue:
                self.fault_queue = self.rng.sample(FAULT_POINTS, len(FAULT_POINTS))
            point = self.fault_queue.pop()
        if point:                      # a clean stop, then a daemon armed with the point
            t = time.monotonic()
            code = stop_daemon(proc, timeout=60)
            self.say(f"round {r}: SIGTERM took {time.monotonic() - t:.1f} s")
            s.clean_stops += 1
            if code != 0:
                self.violate(r, "SIGTERM before an armed start", f"exit code {code}: {log_tail(proc)}")
            proc, address = start(self.data_dir, crash_at=point)
        self.round_how = f"armed with {point}" if point else "SIGKILL"
        rnd = Round(self, r, proc, address, point)
        for w in range(self.writers):
            t = threading.Thread(target=rnd.run_writer, args=(w,), name=f"writer-{w}", daemon=True)
            rnd.threads.append(t)
            t.start()
        how = "SIGKILL"
        if point:
            try:
                proc.wait(self.fault_wait)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() == faults.CRASH_EXIT:
                how = f"fault {point}"
                s.fault_kills[point] = s.fault_kills.get(point, 0) + 1
            elif proc.poll() is None:
                s.fault_untripped += 1
            else:
                self.violate(r, f"armed {point}", f"daemon exited {proc.returncode}: {log_tail(proc)}")
        else:
            time.sleep(self.rng.uniform(0.05, self.max_delay))
        rnd.kill_sent.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            s.sigkills += 1
            how = "SIGKILL" + (f" (armed with {point}, not reached)" if point else "")
        self.round_how = how
        proc.wait(30)
        s.kills += 1
        rnd.stop.set()
        for t in rnd.threads:
            t.join(120)
            if t.is_alive():
                self.violate(r, t.name, "writer still blocked 120 s after the kill")
        inflight = dict(self.model.inflight)
        if self.rng.random() < self.recovery_rate:      # die inside recovery, then recover again
            rpoint = self.rng.choice(RECOVERY_POINTS)
            try:
                p2, _ = start(self.data_dir, crash_at=rpoint)
                p2.send_signal(signal.SIGKILL)          # recovery had nothing to replay: it served
                p2.wait(30)
            except DaemonExited as e:
                if e.rc == faults.CRASH_EXIT:
                    s.recovery_kills += 1
                    s.kills += 1
                    how += f" + recovery {rpoint}"
                    self.round_how = how
                else:
                    self.violate(r, f"restart armed with {rpoint}", f"exit code {e.rc}: {log_tail(e.proc)}")
        t_start = time.monotonic()
        try:
            proc, address = start(self.data_dir)
        except DaemonExited as e:
            self.violate(r, "restart", f"the daemon did not come back (exit {e.rc}):\n{log_tail(e.proc)}")
            raise
        t_check = time.monotonic()
        s.moves_finished += log_tail(proc, 1 << 20).count("finished moving")
        Checker(self, r, address, inflight).check()
        self.model.inflight.clear()
        self.say(f"round {r} ({t_check - t_start:.1f} s restart, {time.monotonic() - t_check:.1f} s "
                 f"check, {len(self.model.banks[FLAT])} rows in {FLAT}): {how}; in flight: "
                 + (", ".join(op.describe() for op in inflight.values()) or "nothing")
                 + f"; {self.round_violations} violations")
        return proc, address


# ---- the checks ---------------------------------------------------------------------

def export_rows(c: MemoryClient, bank: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    chunks = list(c.export(bank))
    if not chunks:
        return (np.empty(0, np.int64), np.empty((0, DIM), np.float32),
                np.empty((0, VDIM), value_dtype(bank)))
    return (np.concatenate([ch.ids for ch in chunks]), np.concatenate([ch.keys for ch in chunks]),
            np.concatenate([ch.values for ch in chunks]))


class Checker:
    def __init__(self, loop: CrashLoop, r: int, address: str, inflight: dict[int, Op]):
        self.loop, self.r, self.address, self.inflight = loop, r, address, inflight
        self.m, self.s = loop.model, loop.summary
        self.rng = np.random.default_rng([loop.seed, r, 999])

    def violate(self, op: str, what: str) -> None:
        self.loop.violate(self.r, op, what)

    def check(self) -> None:
        with MemoryClient(self.address, timeout=120) as c:
            self.c = c
            m = self.m
            names = [FLAT, HNSW, F16, FIFO, PROMO, *m.sessions]
            self.rows: dict[str, dict[int, tuple[bytes, bytes]]] = {}
            self.arrays: dict[str, tuple] = {}
            for b in names:
                ids, keys, vals = export_rows(c, b)
                self.arrays[b] = (ids, keys, vals)
                if len(np.unique(ids)) != len(ids):
                    u, n = np.unique(ids, return_counts=True)
                    self.violate(f"export {b}", f"duplicate ids {u[n > 1][:5].tolist()}")
                self.rows[b] = {int(i): (k.tobytes(), v.tobytes()) for i, k, v in zip(ids, keys, vals)}
            scores = {sid: self.measure_scores(sid) for sid in m.sessions}
            for op in sorted(self.inflight.values(), key=lambda o: o.writer):
                self.resolve(op)
            for b in (FLAT, HNSW, F16, PROMO):
                self.compare(b, {i: (k.tobytes(), v.tobytes()) for i, (k, v) in m.banks[b].items()},
                             m.removed[b])
            for sid in m.sessions:
                want = {i: (k.tobytes(), v.tobytes()) for i, (k, v, _) in m.srows[sid].items()}
                self.compare(sid, want, {})
                self.compare_scores(sid, scores[sid])
            self.check_fifo()
            self.check_moves_unique()
            self.check_usage(names)
            self.check_tiers()
            self.check_search()
            if self.loop.round_violations:
                self.adopt(scores)

    # -- scores, read back by copy-promotes into a scratch bank
    def measure_scores(self, sid: str) -> dict[int, float]:
        c = self.c
        c.create_bank(BankSpec("scratch", dim=DIM, value_dim=VDIM))
        try:
            out: dict[int, float] = {}
            for v in SCORES:
                ge = c.promote_session(sid, "scratch", min_score=float(v), move=False)
                gt = c.promote_session(sid, "scratch", min_score=float(np.nextafter(v, np.float32(np.inf))),
                                       move=False)
                for i in set(int(x) for x in ge.source_ids) - set(int(x) for x in gt.source_ids):
                    out[i] = float(v)
            return out
        finally:
            c.delete_bank("scratch")

    def compare_scores(self, sid: str, measured: dict[int, float]) -> None:
        for i, (_, _, sc) in self.m.srows[sid].items():
            got = measured.get(i)
            if got != float(sc):
                self.violate(f"session {sid} id {i}",
                             f"score {'not one of ' + str(SCORES.tolist()) if got is None else got} "
                             f"!= acknowledged {float(sc)}")
                return
            self.s.rows_checked += 1

    # -- in-flight requests: all there or not there
    def resolve(self, op: Op) -> None:
        m, rows = self.m, self.rows.get(op.bank, {})
        d = op.describe() + (f" (in flight: {op.error})" if op.error else " (in flight)")
        verdict = None
        if op.kind == "add":
            present = [int(i) in rows for i in op.ids]
            if all(present):
                for i, k, v in zip(op.ids, op.keys, op.values):
                    if rows[int(i)] != (k.tobytes(), v.tobytes()):
                        self.violate(d, f"id {int(i)} is there with other bytes than were sent")
                        break
                apply_add(m, op.bank, op.ids, op.keys, op.values, op.writer)
                verdict = "all"
            elif not any(present):
                verdict = "none"
            else:
                self.violate(d, f"torn: {sum(present)} of {len(present)} ids present "
                                f"(missing e.g. {int(op.ids[~np.array(present)][0])})")
                return
        elif op.kind == "fifo_add":
            verdict = self.resolve_fifo(op.keys, op.values, d)
        elif op.kind == "append":
            by_key = {k: i for i, (k, _) in rows.items()}
            found = [by_key.get(k.tobytes()) for k in op.keys]
            if all(f is not None for f in found):
                ids = np.array(found, np.int64)
                for i, v in zip(ids, op.values):
                    if rows[int(i)][1] != v.tobytes():
                        self.violate(d, f"session id {int(i)} has other value bytes than were sent")
                        break
                if any(int(i) in m.sever[op.bank] for i in ids):
                    self.violate(d, "appended rows carry ids the session handed out before")
                if len(np.unique(ids)) != len(ids) or not np.array_equal(ids, np.sort(ids)):
                    self.violate(d, f"appended rows' ids are not one increasing run: {ids[:8]}")
                apply_append(m, op.bank, ids, op.keys, op.values, op.scores)
                verdict = "all"
            elif all(f is None for f in found):
                verdict = "none"
            else:
                self.violate(d, f"torn: {sum(f is not None for f in found)} of {len(found)} rows present")
                return
        elif op.kind == "promote":
            verdict = self.resolve_promote(op, d)
        elif op.kind == "update":
            now = [rows.get(int(i), (None, None))[1] for i in op.ids]
            new = [v.tobytes() for v in op.values]
            old = [v.tobytes() for v in op.old]
            if now == new:
                for i, v in zip(op.ids, op.values):
                    m.banks[op.bank][int(i)] = (m.banks[op.bank][int(i)][0], v)
                verdict = "all"
            elif now == old:
                verdict = "none"
            else:
                n_new = sum(a == b for a, b in zip(now, new))
                n_old = sum(a == b for a, b in zip(now, old))
                self.violate(d, f"torn: {n_new} ids have the new values, {n_old} the old, "
                                f"{len(now) - n_new - n_old} neither")
                return
        elif op.kind == "remove":
            present = [int(i) in rows for i in op.ids]
            if not any(present):
                apply_remove(m, op.bank, op.ids)
                verdict = "all"
            elif all(present):
                verdict = "none"
            else:
                self.violate(d, f"torn: {len(present) - sum(present)} of {len(present)} ids gone")
                return
        elif op.kind == "set_tier":
            tier = self.c.bank_info(op.bank).spec.tier
            if tier == op.tier:
                m.tiers[op.bank] = op.tier
                verdict = "all"
            elif tier == op.old_tier:
                verdict = "none"
            else:
                self.violate(d, f"tier {tier}, neither {op.old_tier} nor {op.tier}")
                return
        tally = self.s.inflight_kinds.setdefault(op.kind, [0, 0])
        if verdict == "all":
            self.s.inflight_all += 1
            tally[0] += 1
        elif verdict == "none":
            self.s.inflight_none += 1
            tally[1] += 1
        elif verdict == "partial-fifo":
            self.s.inflight_partial_fifo += 1

    def resolve_fifo(self, keys, values, d: str, ordered: bool = True) -> str | None:
        """An add of rows (keys, values) to the fifo bank: all there, none, or
        (applied, then partly evicted by a later add) its newest rows only. Its
        ids are one increasing run: in the order of `keys` when ordered (an
        add), in the session's row order otherwise (a promote)."""
        m, rows = self.m, self.rows[FIFO]
        by_key = {k: i for i, (k, _) in rows.items()}
        found = [by_key.get(k.tobytes()) for k in keys]
        idx = [j for j, f in enumerate(found) if f is not None]
        if not idx:
            return "none"
        for j in idx:
            if rows[found[j]][1] != values[j].tobytes():
                self.violate(d, f"fifo id {found[j]} has other value bytes than were sent")
                break
        present = sorted(found[j] for j in idx)
        top, n = present[-1], len(found)
        if ordered:
            base = {found[j] - j for j in idx}
            if len(base) != 1:
                self.violate(d, f"present rows' ids are not the batch's run: {[found[j] for j in idx][:8]}")
                return None
            ok = idx == list(range(idx[0], n))           # missing: the batch's oldest only
        else:
            ok = present == list(range(top - len(present) + 1, top + 1))
        run = range(top - n + 1, top + 1)
        reused = [i for i in run if i in m.fifo_ever]
        if reused:
            self.violate(d, f"fifo ids handed out before: {reused[:5]}")
        for j in idx:
            m.fifo[found[j]] = (keys[j], values[j])
        m.fifo_ever.update(run)
        if len(idx) == n:
            return "all"
        if not ok:
            self.violate(d, f"torn: {n - len(idx)} of {n} rows missing, not the batch's oldest "
                            f"(present ids {present[:8]})")
            return None
        return "partial-fifo"       # applied, then its oldest rows evicted by a later add

    def resolve_promote(self, op: Op, d: str) -> str | None:
        m = self.m
        srows, prow = self.rows[op.bank], self.rows[op.target]
        sel = op.selected or {}
        in_session = [i in srows for i in sel]
        if op.target == FIFO:
            return self.resolve_fifo_promote(op, d, sel, in_session)
        pkeys: dict[bytes, list[int]] = {}
        for i, (k, _) in prow.items():
            pkeys.setdefault(k, []).append(i)
        in_target = [pkeys.get(row[0].tobytes(), []) for row in sel.values()]
        if all(in_session) and not any(in_target):
            return "none"
        if not any(in_session) and all(len(t) == 1 for t in in_target):
            tids = [t[0] for t in in_target]
            for (si, row), ti in zip(sel.items(), tids):
                if prow[ti][1] != row[1].tobytes():
                    self.violate(d, f"moved row {si} -> {ti} has other value bytes")
                    break
            stale = [t for t in tids if t in m.banks[PROMO] or t in m.removed[PROMO]]
            if stale:
                self.violate(d, f"moved rows got ids the target held before: {stale[:5]}")
            apply_move(m, op.bank, op.writer, list(sel), tids)
            return "all" if sel else "none"
        self.violate(d, f"torn move of {len(sel)} rows: {sum(in_session)} still in the session, "
                        f"{sum(bool(t) for t in in_target)} in {op.target} "
                        f"({sum(len(t) > 1 for t in in_target)} there more than once)")
        for (si, row), t, here in zip(sel.items(), in_target, in_session):   # take it as found
            for ti in t:
                m.banks[PROMO][ti] = row[:2]
                m.promo_owner[ti] = op.writer
                m.own(op.writer, PROMO, [ti])
            if not here:
                m.srows[op.bank].pop(si, None)
        return None

    def resolve_fifo_promote(self, op: Op, d: str, sel: dict, in_session: list[bool]) -> str | None:
        fkeys = {k for k, _ in self.rows[FIFO].values()}
        in_target = [row[0].tobytes() in fkeys for row in sel.values()]
        if all(in_session) and not any(in_target):
            return "none"
        if not any(in_session) and any(in_target):
            rows = list(sel.values())
            verdict = self.resolve_fifo([r[0] for r in rows], [r[1] for r in rows], d, ordered=False)
            for i in sel:
                self.m.srows[op.bank].pop(i, None)
            return verdict
        self.violate(d, f"torn move of {len(sel)} rows: {sum(in_session)} still in the session, "
                        f"{sum(in_target)} in {FIFO}")
        rows = list(sel.values())                        # take it as found
        if any(in_target):
            self.resolve_fifo([r[0] for r in rows], [r[1] for r in rows], d, ordered=False)
        for i, here in zip(sel, in_session):
            if not here:
                self.m.srows[op.bank].pop(i, None)
        return None

    # -- contents == model
    def compare(self, bank: str, want: dict[int, tuple[bytes, bytes]], removed: dict) -> None:
        got = self.rows[bank]
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if missing:
            self.violate(f"bank {bank}", f"{len(missing)} acknowledged ids missing, e.g. {missing[:5]}")
        back = [i for i in extra if i in removed]
        phantom = [i for i in extra if i not in removed]
        if back:
            self.violate(f"bank {bank}", f"{len(back)} removed ids are back, e.g. {back[:5]}")
        if phantom:
            self.violate(f"bank {bank}", f"{len(phantom)} phantom ids (nobody added them), e.g. {phantom[:5]}")
        wrong_k = [i for i in want if i in got and got[i][0] != want[i][0]]
        wrong_v = [i for i in want if i in got and got[i][1] != want[i][1]]
        if wrong_k:
            self.violate(f"bank {bank}", f"{len(wrong_k)} ids with other key bytes, e.g. {wrong_k[:5]}")
        if wrong_v:
            self.violate(f"bank {bank}", f"{len(wrong_v)} ids with other value bytes "
                                         f"(e.g. id {wrong_v[0]}: "
                                         f"{np.frombuffer(got[wrong_v[0]][1], value_dtype(bank))} != "
                                         f"{np.frombuffer(want[wrong_v[0]][1], value_dtype(bank))})")
        self.s.rows_checked += len(want)
        if removed:
            sample = list(removed)[-32:]
            r = self.c.get(bank, np.array(sample, np.int64), values=False)
            if r.found.any():
                self.violate(f"bank {bank}", f"get finds removed ids {np.array(sample)[r.found][:5].tolist()}")

    def check_fifo(self) -> None:
        m, got = self.m, self.rows[FIFO]
        d = f"bank {FIFO}"
        phantom = [i for i in got if i not in m.fifo]
        if phantom:
            self.violate(d, f"{len(phantom)} ids that are not (or no longer) written there, e.g. {phantom[:5]}")
        wrong = [i for i in got if i in m.fifo and got[i] != (m.fifo[i][0].tobytes(), m.fifo[i][1].tobytes())]
        if wrong:
            self.violate(d, f"{len(wrong)} ids with other bytes than were written, e.g. {wrong[:5]}")
        if got:
            low = min(got)
            holes = [i for i in m.fifo if i >= low and i not in got]
            if holes:
                self.violate(d, f"not the newest rows: {len(holes)} written ids above the oldest "
                                f"present ({low}) are missing, e.g. {sorted(holes)[:5]}")
        if m.fifo_newest is not None:
            lost = [int(i) for i in m.fifo_newest if int(i) not in got]
            if lost:
                self.violate(d, f"the newest acknowledged batch lost {len(lost)} rows, e.g. {lost[:5]}")
        info = self.c.bank_info(FIFO)
        quota = FIFO_ROWS * ROW_BYTES
        if len(got) * ROW_BYTES > quota or info.used_bytes > quota:
            self.violate(d, f"over quota: {len(got)} rows, used_bytes {info.used_bytes} > {quota}")
        self.s.rows_checked += len(got)
        for i in [i for i in m.fifo if i not in got]:        # evicted: gone for good
            m.fifo_gone[i] = m.fifo.pop(i)[0]
        m.fifo_newest = None      # next round: its own newest acknowledged batch

    def check_moves_unique(self) -> None:
        where: dict[bytes, list[str]] = {}
        for b in (PROMO, FIFO, *self.m.sessions):
            for i, (k, _) in self.rows[b].items():
                where.setdefault(k, []).append(f"{b}:{i}")
        twice = [v for k, v in where.items() if len(v) > 1 and k not in self.m.reported_dups]
        self.m.reported_dups.update(k for k, v in where.items() if len(v) > 1)
        if twice:
            self.violate("moves", f"{len(twice)} session rows are in more than one place, e.g. {twice[0]}")

    def check_usage(self, names: list[str]) -> None:
        c = self.c
        infos = {i.name: i for i in c.list_banks()}
        for b in names:
            info = infos.get(b)
            if info is None:
                self.violate(f"bank {b}", "missing from list_banks")
                continue
            n = len(self.rows[b])
            if info.count != n:
                self.violate(f"bank {b}", f"bank_info count {info.count} != {n} exported rows")
            twin = f"twin-{b}"
            c.create_bank(info.spec.with_(name=twin, quota_bytes=None, eviction="reject"))
            try:
                ids, keys, vals = self.arrays[b]
                if len(ids):
                    c.add(twin, keys, vals, ids=ids)
                t = c.bank_info(twin)
                if (t.used_bytes, t.count) != (info.used_bytes, info.count):
                    self.violate(f"bank {b}", f"used_bytes {info.used_bytes} (count {info.count}) but a "
                                              f"fresh bank with the same {n} rows uses {t.used_bytes} "
                                              f"(count {t.count})")
            finally:
                c.delete_bank(twin)
        infos = c.list_banks("default")
        tenant = c.tenant_info("default")
        total = sum(i.used_bytes for i in infos)
        if tenant.used_bytes != total:
            self.violate("tenant default", f"used_bytes {tenant.used_bytes} != sum over its banks {total}")

    def check_tiers(self) -> None:
        for b, tier in self.m.tiers.items():
            got = self.c.bank_info(b).spec.tier
            if got != tier:
                self.violate(f"bank {b}", f"tier {got}, acknowledged {tier}")

    def check_search(self) -> None:
        c, m = self.c, self.m
        for b in (FLAT, HNSW, F16, PROMO, FIFO):
            rows = self.rows[b]
            ids, keys, vals = self.arrays[b]
            if len(ids):
                pick = self.rng.choice(len(ids), size=min(16, len(ids)), replace=False)
                res = c.search(b, keys[pick], 1, values=True)
                got = res.ids[:, 0]
                ghosts = [int(i) for i in res.ids.reshape(-1) if i >= 0 and int(i) not in rows]
                if ghosts:
                    self.violate(f"search {b}", f"returned ids the bank does not hold: {ghosts[:5]}")
                if b in FLAT_BANKS:
                    miss = np.nonzero(got != ids[pick])[0]
                    if len(miss):
                        j = miss[0]
                        self.violate(f"search {b}", f"{len(miss)}/{len(pick)} stored keys not found as "
                                                    f"themselves: key of id {int(ids[pick][j])} -> "
                                                    f"id {int(got[j])} at {float(res.scores[j, 0])}")
                    elif not (np.abs(res.scores[:, 0]) <= 1e-4).all():
                        self.violate(f"search {b}", f"stored keys at distance {res.scores[:, 0].max()}")
                    elif not np.array_equal(res.values[:, 0].view(np.uint8), vals[pick].view(np.uint8)):
                        self.violate(f"search {b}", "search returned other values than the bank holds")
                self.s.searches_checked += len(pick)
            gone = m.fifo_gone if b == FIFO else m.removed[b]
            if gone:
                sample = list(gone)[-16:]
                res = c.search(b, np.stack([gone[i] for i in sample]), 1, values=False)
                back = [i for i, g in zip(sample, res.ids[:, 0]) if int(g) == i]
                if back:
                    self.violate(f"search {b}", f"removed/evicted ids come back from search: {back[:5]}")
                ghosts = [int(g) for g in res.ids[:, 0] if g >= 0 and int(g) not in rows]
                if ghosts:
                    self.violate(f"search {b}", f"returned ids the bank does not hold: {ghosts[:5]}")
                self.s.searches_checked += len(sample)

    # -- after a violation: take what is there as the truth, so later rounds check afresh
    def adopt(self, scores: dict[str, dict[int, float]]) -> None:
        m = self.m
        for b in (FLAT, HNSW, F16, PROMO):
            ids, keys, vals = self.arrays[b]
            m.banks[b] = {int(i): (k, v) for i, k, v in zip(ids, keys, vals)}
            for w in range(len(m.owned)):
                m.owned[w][b] = set()
            for i in m.banks[b]:
                w = (i >> ID_SHIFT) - 1 if b != PROMO else m.promo_owner.get(i, -1)
                if 0 <= w < len(m.owned):
                    m.owned[w][b].add(i)
        ids, keys, vals = self.arrays[FIFO]
        m.fifo = {int(i): (k, v) for i, k, v in zip(ids, keys, vals)}
        m.fifo_ever.update(m.fifo)
        m.fifo_newest = None
        for sid in m.sessions:
            ids, keys, vals = self.arrays[sid]
            old = m.srows[sid]
            m.srows[sid] = {int(i): (k, v, np.float32(scores[sid].get(int(i), old.get(int(i), (0, 0, np.nan))[2])))
                            for i, k, v in zip(ids, keys, vals)}
            m.sever[sid].update(m.srows[sid])
        for b in TIERED:
            m.tiers[b] = self.c.bank_info(b).spec.tier


def run(data_dir: str | Path | None = None, *, kills: int = 20, seed: int = 1, writers: int = 4,
        fault_rate: float = 0.25, recovery_rate: float = 0.1, max_delay: float = 1.5,
        keep_going: bool = False, verbose: bool = True) -> Summary:
    """Run the loop; the Summary lists every violation (empty: none found)."""
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="crashloop")) / "data"
    loop = CrashLoop(Path(data_dir), kills=kills, seed=seed, writers=writers, fault_rate=fault_rate,
                     recovery_rate=recovery_rate, max_delay=max_delay, keep_going=keep_going,
                     verbose=verbose)
    return loop.run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit code 0: no violation; 1: violations (listed).")
    ap.add_argument("--kills", type=int, default=200, help="kills to survive (default 200)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the schedule and the data (default 1)")
    ap.add_argument("--writers", type=int, default=4, help="writer threads (default 4)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="data dir (default: a new temporary folder, kept afterwards)")
    ap.add_argument("--fault-rate", type=float, default=0.25,
                    help="share of rounds whose daemon is armed with a fault point (default 0.25)")
    ap.add_argument("--recovery-rate", type=float, default=0.1,
                    help="share of restarts armed to die inside recovery first (default 0.1)")
    ap.add_argument("--max-delay", type=float, default=1.5,
                    help="a SIGKILL comes 0.05 .. this many seconds after the writers start (default 1.5)")
    ap.add_argument("--keep-going", action="store_true",
                    help="after a round with violations, take the state as found and go on")
    ap.add_argument("--quiet", action="store_true", help="only the summary and violations")
    a = ap.parse_args(argv)
    s = run(a.data_dir, kills=a.kills, seed=a.seed, writers=a.writers, fault_rate=a.fault_rate,
            recovery_rate=a.recovery_rate, max_delay=a.max_delay, keep_going=a.keep_going,
            verbose=not a.quiet)
    if a.quiet:
        for v in s.violations:
            print("VIOLATION", v)
    print(s.line())
    print(f"data dir: {s.data_dir}")
    return 1 if s.violations else 0


if __name__ == "__main__":
    sys.exit(main())
