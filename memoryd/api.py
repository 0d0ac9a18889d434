"""The backend interface: what every memory backend offers, and its types.

The operations come in four planes, each a Protocol:

    DataPlane      add, search, get, update_values, remove, export
    AdminPlane     create/info/list/delete/freeze banks, quota, tier, stats
    SessionPlane   open, append, info, list, extend, close, promote sessions
    TenantPlane    tenant quotas and usage
    TokenPlane     API tokens: create, list, revoke (memoryd.auth)

and `MemoryBackend` is all five plus `close`. `LocalMemory` (in-process,
memoryd.engine) and `MemoryClient` (gRPC, knnlayer.client) implement it; the
gRPC service, memctl and the attention layer only talk to these protocols,
so a sharded multi-node backend plugs in at the same place. Every method
takes the caller's identity explicitly (`caller=`, a `Caller`; None: the
backend's own default), never from ambient state.

One level below, `ShardSearch` is the fan-out point: one piece of one bank
that answers a top-k search with its payload (values, keys) in the same
call, so a remote shard costs one round trip. Nothing here knows about a
transport.

Search semantics (all backends):
  * every named bank is searched, and one top-k is kept over their union;
  * scores are squared L2 distances (metric l2, best = smallest) or inner
    products (metric ip, best = largest), best first; all banks of one
    search must share dim and metric;
  * where fewer than k items exist, ids are -1, `bank` is -1, scores are
    +inf (l2) / -inf (ip), values and keys are zeros, and `mask` is False;
  * values come back when asked for and some bank holds them (None if no
    bank does); results from a key-only bank carry zero values;
  * `bank[i, j]` is the position in `banks` of the bank that holds
    `ids[i, j]`: ids are unique within a bank, not across banks.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from memoryd.arrays import VALUE_DTYPES
from memoryd.errors import InvalidArgument
from memoryd.keyspace import check_index

KINDS = ("base", "domain", "session")
METRICS = ("l2", "ip")
TIERS = ("ram", "mmap", "gpu")         # where a bank's index and rows live
EVICTIONS = ("reject", "fifo")         # what a write over quota does
MAX_K = 4096          # largest k one search may ask for
MAX_SHARDS = 64
MAX_DIM = 65536       # largest key (and value) dimension
CHUNK_ROWS = 65536    # rows per piece when a bank moves in pieces: export chunks, import
                      # batches, the layer's bank tools
MAX_KEY_VERSION = 128  # characters of BankSpec.key_version
MAX_ID = (1 << 62) - 1  # largest id a caller may give (add ids=): the 2^62 ids above it stay
                        # free for the ids a bank assigns, so assigned ids never overflow int64
BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class BankSpec:
    """What a bank is; fixed at creation (only the quota and tier change later)."""

    name: str
    dim: int
    value_dim: int = 0                 # 0: the bank holds keys only
    kind: str = "domain"
    value_dtype: str = "float32"
    metric: str = "l2"
    index: str = "Flat"                # a faiss index_factory spec
    shards: int = 1
    quota_bytes: int | None = None     # None: unlimited
    tenant: str = "default"
    tier: str = "ram"                  # ram | mmap (rows and flat codes on disk) | gpu
    eviction: str = "reject"           # reject: writes over quota fail; fifo: oldest leave
    key_version: str = ""              # which projection made the keys (a hash); "": unknown

    def validated(self) -> "BankSpec":
        """Self, or InvalidArgument naming the first bad field."""
        if not name_ok(self.name):
            raise InvalidArgument(
                f"bad bank name {self.name!r}: use 1-64 letters, digits, '_', '-', '.', "
                "starting with a letter or digit")
        if not int_ok(self.dim) or not 1 <= self.dim <= MAX_DIM:
            raise InvalidArgument(f"dim must be an integer in 1..{MAX_DIM}; got {self.dim!r}")
        if not int_ok(self.value_dim) or not 0 <= self.value_dim <= MAX_DIM:
            raise InvalidArgument(f"value_dim must be an integer in 0..{MAX_DIM}; got {self.value_dim!r}")
        if self.kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.metric not in METRICS:
            raise InvalidArgument(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise InvalidArgument(
                f"value dtype must be one of {', '.join(VALUE_DTYPES)}; got {self.value_dtype!r}")
        if not int_ok(self.shards) or not 1 <= self.shards <= MAX_SHARDS:
            raise InvalidArgument(f"shards must be in 1..{MAX_SHARDS}; got {self.shards!r}")
        check_quota(self.quota_bytes)
        if not isinstance(self.index, str) or not self.index:
            raise InvalidArgument("index spec must be a non-empty faiss index_factory string")
        check_index(self.index, self.dim)   # supported parts and bounded parameters only
        if not name_ok(self.tenant):
            raise InvalidArgument(f"bad tenant name {self.tenant!r}")
        if self.tier not in TIERS:
            raise InvalidArgument(f"tier must be one of {', '.join(TIERS)}; got {self.tier!r}")
        if self.eviction not in EVICTIONS:
            raise InvalidArgument(
                f"eviction must be one of {', '.join(EVICTIONS)}; got {self.eviction!r}")
        if not key_version_ok(self.key_version):
            raise InvalidArgument(
                f"key_version must be at most {MAX_KEY_VERSION} printable ASCII characters; "
                f"got {self.key_version!r:.80}")
        return self

    def with_(self, **changes: Any) -> "BankSpec":
        return replace(self, **changes)


def name_ok(name: Any) -> bool:
    return isinstance(name, str) and BANK_NAME.fullmatch(name) is not None


def key_version_ok(v: Any) -> bool:
    """A key version is free text for the model side (e.g. a hash of the query
    projection): short printable ASCII, so it fits a catalog column and a table."""
    return isinstance(v, str) and len(v) <= MAX_KEY_VERSION and all(" " <= c <= "~" for c in v)


def int_ok(n: Any) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass(frozen=True)
class BankInfo:
    spec: BankSpec
    count: int = 0
    used_bytes: int = 0
    frozen: bool = False
    trained: bool = False
    checksum: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    tier_bytes: dict[str, int] = field(default_factory=dict)   # {"ram"|"disk"|"gpu": bytes}
    # used_bytes split: what the rows are (ids, keys, values, a session's
    # scores, each held once) and what the index adds (graph links,
    # centroids, its own codes); index = used_bytes - data_bytes
    data_bytes: int = 0

    @property
    def index_bytes(self) -> int:
        return self.used_bytes - self.data_bytes

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("spec"))
        d["index_bytes"] = self.index_bytes
        return d


@dataclass(frozen=True)
class BankQuery:
    """One entry of a search's bank stack, with its own options.

    Merged top-k: each included bank yields its own best `k` (default: the
    search's k); a bank's scores are shifted by `bias` in its favour (added
    to inner products, subtracted from L2 distances); the best k of the
    shifted scores over all banks are returned, best first, with the shifted
    scores. Ties go to the bank named first. `include=False` leaves the bank
    out (its position in `bank` indices is kept).
    """

    name: str
    k: int | None = None
    bias: float = 0.0
    include: bool = True


@dataclass(frozen=True)
class RowStacks:
    """Per-row bank stacks for ONE search: query rows are taken in consecutive
    groups, group i (the next `rows[i]` rows) searching `stacks[i]`.

        RowStacks(stacks=[["s-doc0", "base"], ["s-doc1", "base"]], rows=[T*H, T*H])

    The result equals concatenating search(stacks[i], queries[group i], k)
    over the groups, row for row: ids, scores, values, keys, and `bank`, which
    indexes into each row's own stack. Every stack follows bank_list's rules;
    all banks of all stacks share dim and metric (and value_dim, with values).
    A bank named by several stacks is searched once for all of its rows.
    """

    stacks: tuple[tuple[BankQuery, ...], ...]
    rows: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stacks", tuple(tuple(bank_list(s)) for s in self.stacks))
        object.__setattr__(self, "rows", tuple(self.rows))
        if not self.stacks or len(self.rows) != len(self.stacks):
            raise InvalidArgument(f"row stacks need one row count per stack; got "
                                  f"{len(self.stacks)} stacks and {len(self.rows)} counts")
        if not all(int_ok(r) and r >= 0 for r in self.rows):
            raise InvalidArgument(f"row counts must be non-negative integers; got {list(self.rows)!r}")
        object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))

    @property
    def nq(self) -> int:
        return sum(self.rows)


@dataclass(frozen=True)
class SessionSpec:
    """What OpenSession asks for: the session bank's shape, lifetime and quota."""

    dim: int
    value_dim: int = 0
    value_dtype: str = "float32"
    metric: str = "l2"
    tenant: str = "default"
    ttl_idle_s: float | None = None        # expire after this long without use
    ttl_absolute_s: float | None = None    # expire this long after opening
    quota_bytes: int | None = None
    eviction: str = "reject"               # fifo: oldest memories leave to make room

    def bank_spec(self, name: str) -> BankSpec:
        """The spec of the session's own bank (a small Flat index)."""
        return BankSpec(name=name, dim=self.dim, value_dim=self.value_dim, kind="session",
                        value_dtype=self.value_dtype, metric=self.metric, index="Flat",
                        quota_bytes=self.quota_bytes, tenant=self.tenant, eviction=self.eviction)

    def validated(self) -> "SessionSpec":
        """Self, or InvalidArgument naming the first bad field (TTLs, then the bank's)."""
        check_ttl(self.ttl_idle_s, "ttl_idle_s")
        check_ttl(self.ttl_absolute_s, "ttl_absolute_s")
        self.bank_spec("s-0000000000000000").validated()
        return self


@dataclass(frozen=True)
class SessionInfo:
    session_id: str                        # also the name of its bank
    tenant: str
    created_at: float
    last_used_at: float
    expires_at: float | None               # the earlier of the idle and absolute deadlines
    ttl_idle_s: float | None
    ttl_absolute_s: float | None
    bank: BankInfo

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bank"] = self.bank.to_dict()
        return d


@dataclass(frozen=True)
class PromoteResult:
    promoted: int                          # rows written to the target bank
    duplicates: int                        # skipped as near-identical to a kept key
    target_ids: np.ndarray                 # (promoted,) ids in the target bank
    source_ids: np.ndarray                 # (promoted,) their ids in the session
    moved: bool                            # True: removed from the session

    def to_dict(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "duplicates": self.duplicates, "moved": self.moved,
                "target_ids": self.target_ids.tolist(), "source_ids": self.source_ids.tolist()}


@dataclass(frozen=True)
class TenantInfo:
    name: str
    quota_bytes: int | None
    used_bytes: int
    banks: int
    sessions: int
    tier_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StackUse:
    """A bank stack some client searched, from the daemon's recent history."""

    client: str
    banks: tuple[str, ...]
    searches: int
    last_used_at: float


@dataclass
class SearchResult:
    ids: np.ndarray                    # (nq, k) int64, -1 where missing
    scores: np.ndarray                 # (nq, k) float32, best first
    bank: np.ndarray                   # (nq, k) int32, index into the banks searched
    values: np.ndarray | None = None   # (nq, k, value_dim), zeros where missing
    keys: np.ndarray | None = None     # (nq, k, dim) float32, zeros where missing
    # shards (of a sharded backend that allows partial results) that did not
    # answer: the results are the best k of the others'; () = complete
    missing_shards: tuple[int, ...] = ()

    @property
    def mask(self) -> np.ndarray:      # (nq, k) bool, True where a result exists
        return self.ids >= 0


@dataclass
class GetResult:
    found: np.ndarray                  # (n,) bool
    values: np.ndarray | None = None   # (n, value_dim), zeros where not found
    keys: np.ndarray | None = None     # (n, dim) float32, zeros where not found


@dataclass
class Stats:
    version: str
    data_dir: str
    catalog_url: str
    uptime_s: float
    banks: list[BankInfo] = field(default_factory=list)
    used_bytes: int = 0
    num_gpus: int = 0
    stacks: list[StackUse] = field(default_factory=list)
    tenants: list[TenantInfo] = field(default_factory=list)


@dataclass
class ExportChunk:
    ids: np.ndarray                    # (n,) int64
    keys: np.ndarray                   # (n, dim) float32
    values: np.ndarray | None          # (n, value_dim) or None for key-only banks


RIGHTS = ("read", "write", "admin")   # what a token allows (memoryd.auth.rights)
ROLES = {"read": frozenset({"read"}), "write": frozenset({"read", "write"}),
         "admin": frozenset(RIGHTS)}   # a token's role -> its rights


@dataclass(frozen=True)
class Caller:
    """Who makes a request and what it may do. The daemon builds one per call
    from the call's metadata (with `memoryd serve --auth`: from its token); an
    in-process caller may pass its own. The defaults are the owner's: every
    right on every tenant, so `Caller("name")` only names someone (Stats.stacks)."""

    name: str
    tenant: str | None = None          # the one tenant it acts within; None: every tenant
    rights: frozenset = ROLES["admin"]  # of RIGHTS
    token_id: str | None = None        # the token it came with (owns its reply buffers)
    # the bearer token exactly as the call carried it, kept where no token is
    # checked (auth off): a router (memoryd.cluster) forwards it to its shards,
    # which check it; never shown, never logged
    credential: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TokenInfo:
    """An API token as the catalog keeps it: never the secret, only its hash."""

    id: str
    tenant: str | None                 # None: an admin token, every tenant
    role: str                          # read | write | admin (ROLES)
    name: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CreatedToken:
    info: TokenInfo
    token: str                         # "mdt_<id>_<secret>": shown this once, stored hashed


@runtime_checkable
class DataPlane(Protocol):
    """Rows in and out of banks.

    Every write (add, update_values, remove; append and promote_session
    too) is one record of its bank's write-ahead log: all of it or none of
    it across a crash. `ack` says what the reply promises: "applied" (the
    default: logged and applied, survives a crash of the process) or
    "durable" (fsync'd first, survives a power cut); see memoryd.storage.wal.
    """

    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None, *,
            ack: str | None = None, caller: Caller | None = None) -> np.ndarray: ...
    def search(self, banks: str | BankQuery | Sequence[str | BankQuery] | RowStacks,
               queries: Any, k: int, values: bool = True, keys: bool = False, *,
               caller: Caller | None = None) -> SearchResult: ...
    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False, *,
            caller: Caller | None = None) -> GetResult: ...
    def update_values(self, bank: str, ids: Any, values: Any, *, ack: str | None = None,
                      caller: Caller | None = None) -> int: ...
    def remove(self, bank: str, ids: Any, *, ack: str | None = None,
               caller: Caller | None = None) -> int: ...
    def export(self, bank: str, chunk_rows: int = CHUNK_ROWS, *,
               caller: Caller | None = None) -> Iterator[ExportChunk]: ...


@runtime_checkable
class AdminPlane(Protocol):
    """Banks as objects: their life cycle, quota and tier; the whole daemon's stats."""

    def create_bank(self, spec: BankSpec, *, caller: Caller | None = None) -> BankInfo: ...
    def bank_info(self, name: str, *, caller: Caller | None = None) -> BankInfo: ...
    def list_banks(self, tenant: str | None = None, *,
                   caller: Caller | None = None) -> list[BankInfo]: ...
    def delete_bank(self, name: str, *, caller: Caller | None = None) -> int: ...   # released bytes
    def freeze_bank(self, name: str, *, caller: Caller | None = None) -> BankInfo: ...
    def set_quota(self, name: str, quota_bytes: int | None, *,
                  caller: Caller | None = None) -> BankInfo: ...
    def set_tier(self, name: str, tier: str, *,
                 caller: Caller | None = None) -> BankInfo: ...      # moves a live bank
    def stats(self, *, caller: Caller | None = None) -> Stats: ...


@runtime_checkable
class SessionPlane(Protocol):
    """Short-term memory written during inference: one small bank per session.

    extend: the idle clock restarts; None keeps a TTL; a new idle TTL replaces
    the old; a new absolute TTL counts from now (ttl_absolute_s then reads the
    time already lived plus the new value).
    """

    def open_session(self, spec: SessionSpec, *, caller: Caller | None = None) -> SessionInfo: ...
    def append(self, session_id: str, keys: Any, values: Any = None, scores: Any = None, *,
               ack: str | None = None, caller: Caller | None = None) -> np.ndarray: ...  # read-your-writes
    def session_info(self, session_id: str, *, caller: Caller | None = None) -> SessionInfo: ...
    def list_sessions(self, tenant: str | None = None, *,
                      caller: Caller | None = None) -> list[SessionInfo]: ...
    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None, *,
                       caller: Caller | None = None) -> SessionInfo: ...
    def close_session(self, session_id: str, *, caller: Caller | None = None) -> int: ...
    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False, ack: str | None = None,
                        caller: Caller | None = None) -> PromoteResult: ...


@runtime_checkable
class TenantPlane(Protocol):
    """The storage a user bought: quotas over all of a tenant's banks and sessions."""

    def set_tenant_quota(self, tenant: str, quota_bytes: int | None, *,
                         caller: Caller | None = None) -> TenantInfo: ...
    def tenant_info(self, tenant: str, *, caller: Caller | None = None) -> TenantInfo: ...
    def list_tenants(self, *, caller: Caller | None = None) -> list[TenantInfo]: ...


@runtime_checkable
class TokenPlane(Protocol):
    """API tokens (admin only): the secret of a new one is in CreatedToken.token,
    once; revoking takes effect within the daemon's token cache TTL (1 s)."""

    def create_token(self, tenant: str | None = None, role: str = "write", name: str = "", *,
                     caller: Caller | None = None) -> CreatedToken: ...
    def list_tokens(self, tenant: str | None = None, *,
                    caller: Caller | None = None) -> list[TokenInfo]: ...
    def revoke_token(self, token_id: str, *, caller: Caller | None = None) -> TokenInfo: ...


@dataclass(frozen=True)
class SnapshotInfo:
    """A bank snapshot (memoryd.engine.backup) or, with bank "", a daemon backup."""

    path: str                          # the folder, on the daemon's host
    bank: str                          # the bank's name ("" for a backup)
    count: int                         # rows (a backup: 0)
    used_bytes: int
    checksum: str                      # the bank's (a backup: "")
    banks: tuple[str, ...] = ()        # a backup's banks


@runtime_checkable
class BackupPlane(Protocol):
    """Snapshots and backups: folders on the daemon's host (admin only)."""

    def snapshot_bank(self, name: str, path: str, *,
                      caller: Caller | None = None) -> SnapshotInfo: ...
    def restore_bank(self, path: str, name: str | None = None, *,
                     caller: Caller | None = None) -> BankInfo: ...
    def backup(self, path: str, *, caller: Caller | None = None) -> SnapshotInfo: ...


@runtime_checkable
class MemoryBackend(DataPlane, AdminPlane, SessionPlane, TenantPlane, TokenPlane, BackupPlane,
                    Protocol):
    """Every plane: what LocalMemory and MemoryClient (and a sharded backend) offer."""

    def close(self) -> None: ...


@runtime_checkable
class ShardSearch(Protocol):
    """One piece of one bank that answers a search in ONE call, payload included.

    Returns a SearchResult of (nq, k) best-first results of this piece alone
    (`bank` is 0 where a result exists, -1 where not), with values in the
    bank's own value dtype when asked and held, and keys when asked. The
    engine fans a stack out over these and merges them (memoryd.topk); a
    shard in another process implements the same call as one RPC.
    """

    def search(self, queries: np.ndarray, k: int, *, values: bool,
               keys: bool) -> SearchResult: ...


def bank_list(banks: str | BankQuery | Sequence[str | BankQuery]) -> list[BankQuery]:
    """Normalise the banks argument of search: names or BankQuery, no repeats."""
    items = [banks] if isinstance(banks, (str, BankQuery)) else list(banks)
    stack = [b if isinstance(b, BankQuery) else BankQuery(b) for b in items]
    if not stack:
        raise InvalidArgument("search needs at least one bank")
    names = [b.name for b in stack]
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"bank names must be strings; got {names!r}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"a bank is named twice in one search: {names}")
    for b in stack:
        if b.k is not None:
            check_k(b.k)
        if not is_number(b.bias) or not np.isfinite(b.bias):
            raise InvalidArgument(f"bias of bank '{b.name}' must be a finite number; got {b.bias!r}")
    if not any(b.include for b in stack):
        raise InvalidArgument("every bank of the search is excluded: include at least one")
    return stack


def check_ttl(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not value > 0 or not np.isfinite(value):
        raise InvalidArgument(f"{what} must be a positive number of seconds or None; got {value!r}")
    return float(value)


def check_quota(quota_bytes: Any) -> int | None:
    """A quota in bytes (None: unlimited), or InvalidArgument: the one quota check."""
    if quota_bytes is not None and (not int_ok(quota_bytes) or quota_bytes < 0):
        raise InvalidArgument(f"quota must be a non-negative number of bytes or None (unlimited); "
                              f"got {quota_bytes!r}")
    return None if quota_bytes is None else int(quota_bytes)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgument(f"k must be an integer; got {k!r}")
    if not 1 <= int(k) <= MAX_K:
        raise InvalidArgument(f"k must be in 1..{MAX_K}; got {k}")
    return int(k)


MAX_RESULTS = 1 << 24          # nq * k of one search (ids of one get): 16.7M results
MAX_REPLY_BYTES = 1 << 32      # the arrays of one search's (or get's) reply: 4 GiB


def check_result_size(nq: int, k: int, payload_bytes: int = 0, what: str = "search") -> None:
    """InvalidArgument before a search (or get) whose reply would be absurd: nq
    queries x k results, each 16 bytes (id, score, bank) plus payload_bytes (its
    value and key vectors, when asked), against MAX_RESULTS and MAX_REPLY_BYTES.
    FAISS and numpy would otherwise allocate it (nq=100k, k=4096: 4.9 GB before the
    merge) and either fail (MemoryError: INTERNAL) or get the daemon killed."""
    results = int(nq) * int(k)
    size = results * (16 + int(payload_bytes))
    if results > MAX_RESULTS or size > MAX_REPLY_BYTES:
        raise InvalidArgument(
            f"{what} of {nq} queries x k={k} would return {results:,} results "
            f"({size:,} bytes); at most {MAX_RESULTS:,} results and {MAX_REPLY_BYTES:,} bytes "
            "a request: send fewer queries (or ids) per request, or a smaller k")
