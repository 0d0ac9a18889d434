"""MemoryClient: the MemoryBackend interface over gRPC to a memoryd daemon.

    with MemoryClient("unix:///run/memoryd/memoryd.sock") as mem:
        mem.add("wiki", keys, values)
        r = mem.search(["wiki"], queries, k=32)

Results have the same types, dtypes and shapes as LocalMemory's, and errors
come back as the same memoryd.errors classes (the server's ErrorInfo names
the exact class; QuotaExceeded is rebuilt with .used/.limit/.requested).

Inputs may be numpy arrays, torch tensors (any device) or nested lists. The
client converts only where that is cheap and loses nothing the server would
keep: keys and queries go as float32, ids as int64, values as given when the
wire carries their dtype (float32/float16/bfloat16) and as float32 otherwise
(e.g. float64); the server casts values to the bank's value dtype, exactly as
LocalMemory does, and validates everything (shapes, dims, NaN, ...), so the
messages are the same from both backends.

Search replies from a daemon on the same host come through shared memory
(reply buffers, knnlayer/reply_buffers.py): by default whenever the address
is a unix socket; `reply_buffers=True` also tries it over TCP (loopback),
False never. Results are the same either way.

The client names itself to the daemon (metadata `x-memoryd-client`, default
"<hostname>:<pid>"), so the daemon's Stats.stacks says who searched what.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import os
import socket
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from knnlayer.reply_buffers import ReplyBufferPool
from memoryd import api, errors, fastwire, shm, wire
from memoryd.arrays import BFLOAT16, to_numpy
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc

_WIRE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


# ---- errors -------------------------------------------------------------------

def _error_info(e: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(e)
    except (ValueError, AttributeError):   # mismatched or no trailing status
        return None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == errors.ERROR_DOMAIN:
                return info
    return None


def map_rpc_error(e: grpc.RpcError, address: str) -> errors.MemoryError:
    """The memoryd.errors exception for a failed call."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    message = e.details() if hasattr(e, "details") else str(e)
    if name == "UNAVAILABLE":
        return errors.Unavailable(f"memoryd at {address} is unavailable: {message}")
    info = _error_info(e)
    cls = errors.BY_REASON.get(info.reason) if info is not None else None
    if cls is errors.QuotaExceeded:
        m = info.metadata
        try:
            return errors.QuotaExceeded(m["bank"], int(m["used"]), int(m["limit"]),
                                        int(m["requested"]), scope=m.get("scope", "bank"))
        except (KeyError, ValueError):
            cls = None                      # malformed details: fall back to the code
    if cls is None or cls.code != name:
        cls = errors.BY_CODE.get(name)
    if cls is None or cls is errors.QuotaExceeded:
        err = errors.MemoryError(f"{name}: {message}")
        err.code = name                     # keep e.g. DEADLINE_EXCEEDED visible
        return err
    return cls(message)


def _mapped(fn: Callable) -> Callable:
    """Raise memoryd.errors instead of grpc.RpcError, also while a stream is read."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except grpc.RpcError as e:
                raise map_rpc_error(e, self.address) from None
        return gen

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except grpc.RpcError as e:
            raise map_rpc_error(e, self.address) from None
    return call


# ---- array preparation (conversion only; the server validates) -----------------

def _as_float32(x: Any) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype != np.float32 and (a.dtype.kind in "fiu" or a.dtype == BFLOAT16):
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(np.float32)
    return a


def _as_values(x: Any) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype not in _WIRE_FLOATS and a.dtype.kind in "fiu":
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(np.float32)
    return a


def _as_ids(x: Any, what: str = "ids") -> np.ndarray:
    a = to_numpy(x)
    if a.size == 0:                          # e.g. [] (float64): no values to lose
        return a.astype(np.int64)
    if a.dtype == np.uint64 and a.max() > np.iinfo(np.int64).max:   # would wrap
        raise errors.InvalidArgument(f"{what} must fit in int64; got {int(a.max())}")
    if a.dtype.kind in "iu" and a.dtype != np.int64:
        a = a.astype(np.int64)
    return a


def _row_chunks(arrays: dict[str, np.ndarray | None]) -> Iterator[dict[str, np.ndarray]]:
    """Cut arrays into aligned row blocks of about wire.CHUNK_BYTES.

    Arrays that disagree on their row count (or are 0-d) go in one message so
    that the server sees, and reports, the mismatch exactly as sent.
    """
    present = {k: a for k, a in arrays.items() if a is not None}
    lengths = {a.shape[0] if a.ndim else -1 for a in present.values()}
    if len(lengths) != 1 or -1 in lengths:
        yield present
        return
    n = lengths.pop()
    row = sum(a[:1].nbytes for a in present.values()) if n else 1
    for s in wire.chunk_slices(n, row):
        yield {k: a[s] for k, a in present.items()}


def _encode(a: np.ndarray, what: str) -> pb.Tensor:
    try:
        return wire.encode(a)
    except errors.InvalidArgument as e:
        raise errors.InvalidArgument(f"{what}: {e}") from None


def _encoded(arrays: dict[str, np.ndarray]) -> dict[str, pb.Tensor]:
    return {k: _encode(a, k) for k, a in arrays.items()}


def _started(messages: Iterator) -> Iterator:
    """The request stream with its first message already built.

    gRPC swallows an exception raised while it iterates a request stream
    (the call fails as UNKNOWN); building the first message here raises a
    bad dtype in the caller instead. Later chunks share the first's dtypes.
    """
    first = next(messages)
    return itertools.chain([first], messages)


def _cat(blocks: list[np.ndarray]) -> np.ndarray:
    # Always a fresh, writable array: decoded blocks are read-only views of the
    # message (copied here), blocks read from a reply buffer are copies already.
    if len(blocks) == 1:
        return blocks[0] if blocks[0].flags.writeable else blocks[0].copy()
    return np.concatenate(blocks)


def _opt(blocks: list[np.ndarray]) -> np.ndarray | None:
    return _cat(blocks) if blocks else None


def _client_name(name: str | None) -> str:
    """The x-memoryd-client value: printable ASCII (what gRPC metadata carries)."""
    if name is None:
        name = f"{socket.gethostname()}:{os.getpid()}"
        return "".join(c if " " <= c <= "~" else "?" for c in name)
    if not isinstance(name, str) or not 1 <= len(name) <= 256 \
            or not all(" " <= c <= "~" for c in name):
        raise errors.InvalidArgument(
            f"client_name must be 1-256 printable ASCII characters; got {name!r}")
    return name


def _opt_float(x: Any, what: str) -> float | None:
    """None, or x as a float for a proto3 `optional double` (the server validates it)."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise errors.InvalidArgument(f"{what} must be a number or None; got {x!r}")
    return float(x)


def _rows(c: api.ExportChunk, s: slice) -> api.ExportChunk:
    return api.ExportChunk(ids=c.ids[s], keys=c.keys[s],
                           values=None if c.values is None else c.values[s])


def _join(chunks: list[api.ExportChunk]) -> api.ExportChunk:
    if len(chunks) == 1:
        return chunks[0]
    return api.ExportChunk(
        ids=np.concatenate([c.ids for c in chunks]), keys=np.concatenate([c.keys for c in chunks]),
        values=None if chunks[0].values is None else np.concatenate([c.values for c in chunks]))


class MemoryClient:
    """A MemoryBackend that talks to memoryd over gRPC."""

    def __init__(self, address: str, *, timeout: float | None = None, wait_ready: float = 10.0,
                 client_name: str | None = None, reply_buffers: bool | None = None):
        self.address = address
        self.timeout = timeout
        self.client_name = _client_name(client_name)
        self._metadata = ((wire.CLIENT_METADATA, self.client_name),)
        self._channel = grpc.insecure_channel(wire.grpc_target(address), options=wire.CHANNEL_OPTIONS)
        self._stub = pb_grpc.MemoryStub(self._channel)
        # Search replies are read by fastwire: zero-copy views of the message
        # bytes instead of protobuf objects (the same wire format).
        self._search = self._channel.unary_stream(
            "/memoryd.v1.Memory/Search", request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=functools.partial(fastwire.decode, pb.SearchResponse),
            _registered_method=True)
        if reply_buffers is None:                # same host for sure: a unix socket
            reply_buffers = wire.grpc_target(address).startswith("unix:")
        self._buffers = (ReplyBufferPool(self._open_reply_buffer, self._close_reply_buffer)
                         if reply_buffers else None)
        if wait_ready:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=wait_ready)
            except grpc.FutureTimeoutError:
                self._channel.close()
                raise errors.Unavailable(
                    f"no memoryd answering at {address} after {wait_ready:g} s") from None

    # -- lifecycle
    def close(self) -> None:
        if self._buffers is not None:
            self._buffers.close()
        self._channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryClient({self.address!r})"

    @property
    def _opts(self) -> dict[str, Any]:
        """Keyword arguments of every call: the timeout and who is calling."""
        return {"timeout": self.timeout, "metadata": self._metadata}

    @_mapped
    def ping(self, payload: bytes = b"") -> bytes:
        return self._stub.Ping(pb.PingRequest(payload=payload), **self._opts).payload

    # -- banks
    @_mapped
    def create_bank(self, spec: api.BankSpec) -> api.BankInfo:
        # The shared check, here because the wire cannot carry a bad spec: an
        # unknown kind or metric would arrive unset and become the default.
        spec.validated()
        req = pb.CreateBankRequest(spec=wire.spec_to_pb(spec))
        return wire.info_from_pb(self._stub.CreateBank(req, **self._opts))

    @_mapped
    def bank_info(self, name: str) -> api.BankInfo:
        return wire.info_from_pb(self._stub.GetBank(pb.BankRef(name=name), **self._opts))

    @_mapped
    def list_banks(self, tenant: str | None = None) -> list[api.BankInfo]:
        reply = self._stub.ListBanks(pb.ListBanksRequest(tenant=tenant or ""), **self._opts)
        return [wire.info_from_pb(b) for b in reply.banks]

    @_mapped
    def delete_bank(self, name: str) -> int:
        return self._stub.DeleteBank(pb.BankRef(name=name), **self._opts).released_bytes

    @_mapped
    def freeze_bank(self, name: str) -> api.BankInfo:
        return wire.info_from_pb(self._stub.FreezeBank(pb.BankRef(name=name), **self._opts))

    @_mapped
    def set_quota(self, name: str, quota_bytes: int | None) -> api.BankInfo:
        if quota_bytes is not None and quota_bytes < 0:   # -1 means unlimited on the wire
            raise errors.InvalidArgument(f"quota must not be negative; got {quota_bytes}")
        req = pb.SetQuotaRequest(name=name, quota_bytes=wire.quota_to_pb(quota_bytes))
        return wire.info_from_pb(self._stub.SetQuota(req, **self._opts))

    @_mapped
    def set_tier(self, name: str, tier: str) -> api.BankInfo:
        if not isinstance(tier, str):   # any string travels; the daemon names a bad one
            raise errors.InvalidArgument(
                f"tier must be one of {', '.join(api.TIERS)}; got {tier!r}")
        req = pb.SetTierRequest(name=name, tier=tier)
        return wire.info_from_pb(self._stub.SetTier(req, **self._opts))

    # -- data
    @_mapped
    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None) -> np.ndarray:
        arrays = {"keys": _as_float32(keys),
                  "values": None if values is None else _as_values(values),
                  "ids": None if ids is None else _as_ids(ids)}

        requests = (pb.AddRequest(bank=bank if i == 0 else "", **_encoded(c))
                    for i, c in enumerate(_row_chunks(arrays)))
        reply = self._stub.Add(_started(requests), **self._opts)
        return wire.decode(reply.ids, "ids").copy()

    @_mapped
    def update_values(self, bank: str, ids: Any, values: Any) -> int:
        arrays = {"ids": _as_ids(ids), "values": _as_values(values)}

        requests = (pb.UpdateValuesRequest(bank=bank if i == 0 else "", **_encoded(c))
                    for i, c in enumerate(_row_chunks(arrays)))
        return self._stub.UpdateValues(_started(requests), **self._opts).updated

    @_mapped
    def remove(self, bank: str, ids: Any) -> int:
        req = pb.RemoveRequest(bank=bank, ids=_encode(_as_ids(ids), "ids"))
        return self._stub.Remove(req, **self._opts).removed

    @_mapped
    def search(self, banks: str | api.BankQuery | Sequence[str | api.BankQuery], queries: Any,
               k: int, values: bool = True, keys: bool = False) -> api.SearchResult:
        # The shared checks: a bad k or stack must not reach int32/double packing.
        stack = api.bank_list(banks)
        k = api.check_k(k)
        queries = _as_float32(queries)
        if wire.is_plain(stack):   # the common case, and what older daemons understand
            req = pb.SearchRequest(banks=[q.name for q in stack], k=k, values=values, keys=keys)
        else:
            req = pb.SearchRequest(stack=[wire.bank_query_to_pb(q) for q in stack],
                                   k=k, values=values, keys=keys)
        pool = self._buffers
        buf = pool.take() if pool is not None else None
        try:
            result = self._search_reply(req, queries, buf)
        except errors.UnknownReplyBuffer:        # the daemon closed it (idle, restarted)
            pool.drop(buf)
            buf = None
            result = self._search_reply(req, queries, None)
        except BaseException:                    # a cancelled call may still write into buf
            if buf is not None:
                pool.drop(buf)
            raise
        if pool is not None:
            pool.give(buf, shm.layout({"ids": result.ids, "scores": result.scores,
                                       "bank": result.bank, "values": result.values,
                                       "keys": result.keys})[1])
        return result

    @_mapped
    def _search_reply(self, req: pb.SearchRequest, queries: np.ndarray,
                      buf: shm.MappedReplyBuffer | None) -> api.SearchResult:
        """Run one Search (through buf when given) and assemble its reply.

        With a buffer, the queries go in it too when they fit (the daemon
        reads them before it writes the reply over them).
        """
        req.reply_buffer = buf.handle if buf is not None else ""
        if (buf is not None and buf.writable and queries.dtype == np.float32
                and queries.ndim == 2 and queries.nbytes <= buf.size):
            p = buf.write(queries)
            req.queries.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=p.shape, buffer_offset=p.offset))
        else:
            req.queries.CopyFrom(_encode(queries, "queries"))
        blocks: dict[str, list] = {f: [] for f in ("ids", "scores", "bank", "values", "keys")}
        for msg in self._search(req, **self._opts):
            self._check_offset(msg.get("offset", 0), blocks["ids"], "Search")
            for f in blocks:
                if f in msg:
                    blocks[f].append(msg[f])
        for f, parts in blocks.items():          # arrays in the buffer: copied out of it
            if any(isinstance(p, shm.Placed) for p in parts):
                if buf is None or len(parts) != 1:
                    raise errors.MemoryError(f"Search reply puts '{f}' in a reply buffer "
                                             "this call did not offer")
                blocks[f] = [buf.read(parts[0])]
        return api.SearchResult(ids=_cat(blocks["ids"]), scores=_cat(blocks["scores"]),
                                bank=_cat(blocks["bank"]), values=_opt(blocks["values"]),
                                keys=_opt(blocks["keys"]))

    @_mapped
    def _open_reply_buffer(self, size: int) -> pb.ReplyBuffer:
        return self._stub.OpenReplyBuffer(pb.OpenReplyBufferRequest(size_bytes=size), **self._opts)

    @_mapped
    def _close_reply_buffer(self, handle: str) -> None:
        self._stub.CloseReplyBuffer(pb.ReplyBufferRef(handle=handle), **self._opts)

    @property
    def reply_buffers(self) -> str:
        """How search replies travel: 'shared memory', or 'socket (<why>)'."""
        if self._buffers is None:
            return "socket (reply buffers not asked for)"
        return ("shared memory" if self._buffers.off_reason is None
                else f"socket ({self._buffers.off_reason})")

    @_mapped
    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False) -> api.GetResult:
        req = pb.GetRequest(bank=bank, ids=_encode(_as_ids(ids), "ids"), values=values,
                            keys=keys)
        blocks: dict[str, list[np.ndarray]] = {"found": [], "values": [], "keys": []}
        for msg in self._stub.Get(req, **self._opts):
            self._check_offset(msg.offset, blocks["found"], "Get")
            for f in blocks:
                if msg.HasField(f):
                    blocks[f].append(wire.decode(getattr(msg, f), f))
        return api.GetResult(found=_cat(blocks["found"]).astype(bool),
                             values=_opt(blocks["values"]), keys=_opt(blocks["keys"]))

    @_mapped
    def export(self, bank: str, chunk_rows: int = 65536) -> Iterator[api.ExportChunk]:
        """Chunks of up to chunk_rows rows (the wire cuts them smaller; re-joined here).

        Like LocalMemory, a bad request (no such bank, ...) raises here, not
        at the first next(): the first reply is awaited before returning.
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
                or chunk_rows <= 0:      # 0 would mean "server default" on the wire
            raise errors.InvalidArgument(f"chunk_rows must be positive; got {chunk_rows}")
        call = self._stub.Export(pb.ExportRequest(bank=bank, chunk_rows=chunk_rows),
                                 **self._opts)
        first = next(call, None)
        return self._export_rest(call, first, chunk_rows)

    @_mapped
    def _export_rest(self, call, first, chunk_rows: int) -> Iterator[api.ExportChunk]:
        # The wire cuts chunks by bytes and carries no chunk boundaries:
        # re-cut into chunks of exactly chunk_rows rows (the last may be short).
        pending: list[api.ExportChunk] = []
        rows = 0
        for msg in itertools.chain([first] if first is not None else [], call):
            pending.append(self._export_chunk([msg]))
            rows += len(pending[-1].ids)
            while rows >= chunk_rows:
                whole = _join(pending)
                yield _rows(whole, slice(0, chunk_rows))
                pending = [_rows(whole, slice(chunk_rows, None))]
                rows -= chunk_rows
        if rows:
            yield _join(pending)

    @_mapped
    def stats(self) -> api.Stats:
        return wire.stats_from_pb(self._stub.Stats(pb.StatsRequest(), **self._opts))

    # -- sessions
    @_mapped
    def open_session(self, spec: api.SessionSpec) -> api.SessionInfo:
        req = pb.OpenSessionRequest(spec=wire.session_spec_to_pb(spec))
        return wire.session_from_pb(self._stub.OpenSession(req, **self._opts))

    @_mapped
    def append(self, session_id: str, keys: Any, values: Any = None,
               scores: Any = None) -> np.ndarray:
        arrays = {"keys": _as_float32(keys),
                  "values": None if values is None else _as_values(values),
                  "scores": None if scores is None else _as_float32(scores)}

        requests = (pb.AppendRequest(session_id=session_id if i == 0 else "", **_encoded(c))
                    for i, c in enumerate(_row_chunks(arrays)))
        reply = self._stub.Append(_started(requests), **self._opts)
        return wire.decode(reply.ids, "ids").copy()

    @_mapped
    def session_info(self, session_id: str) -> api.SessionInfo:
        req = pb.SessionRef(session_id=session_id)
        return wire.session_from_pb(self._stub.GetSession(req, **self._opts))

    @_mapped
    def list_sessions(self, tenant: str | None = None) -> list[api.SessionInfo]:
        reply = self._stub.ListSessions(pb.ListSessionsRequest(tenant=tenant or ""), **self._opts)
        return [wire.session_from_pb(s) for s in reply.sessions]

    @_mapped
    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None) -> api.SessionInfo:
        req = pb.ExtendSessionRequest(
            session_id=session_id, ttl_idle_s=_opt_float(ttl_idle_s, "ttl_idle_s"),
            ttl_absolute_s=_opt_float(ttl_absolute_s, "ttl_absolute_s"))
        return wire.session_from_pb(self._stub.ExtendSession(req, **self._opts))

    @_mapped
    def close_session(self, session_id: str) -> int:
        req = pb.SessionRef(session_id=session_id)
        return self._stub.CloseSession(req, **self._opts).released_bytes

    @_mapped
    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False) -> api.PromoteResult:
        req = pb.PromoteSessionRequest(
            session_id=session_id, target=target,
            ids=None if ids is None else _encode(_as_ids(ids), "ids"),
            min_score=_opt_float(min_score, "min_score"), dedup=_opt_float(dedup, "dedup"),
            move=bool(move))
        return wire.promote_from_pb(self._stub.PromoteSession(req, **self._opts))

    # -- tenants
    @_mapped
    def set_tenant_quota(self, tenant: str, quota_bytes: int | None) -> api.TenantInfo:
        # -1 means unlimited on the wire, and int64 carries no fractions: check here
        if quota_bytes is not None and (not api.int_ok(quota_bytes) or quota_bytes < 0):
            raise errors.InvalidArgument(
                f"quota must be a non-negative number of bytes; got {quota_bytes!r}")
        req = pb.SetTenantQuotaRequest(tenant=tenant, quota_bytes=wire.quota_to_pb(quota_bytes))
        return wire.tenant_from_pb(self._stub.SetTenantQuota(req, **self._opts))

    @_mapped
    def tenant_info(self, tenant: str) -> api.TenantInfo:
        return wire.tenant_from_pb(self._stub.GetTenant(pb.TenantRef(name=tenant), **self._opts))

    @_mapped
    def list_tenants(self) -> list[api.TenantInfo]:
        reply = self._stub.ListTenants(pb.ListTenantsRequest(), **self._opts)
        return [wire.tenant_from_pb(t) for t in reply.tenants]

    # -- helpers
    @staticmethod
    def _check_offset(offset: int, blocks: list[np.ndarray], rpc: str) -> None:
        expected = sum(len(b) for b in blocks)
        if offset != expected:
            raise errors.MemoryError(
                f"{rpc} reply out of order: block at row {offset}, expected row {expected}")

    @staticmethod
    def _export_chunk(msgs: list[pb.ExportChunk]) -> api.ExportChunk:
        values = [wire.decode(m.values, "values") for m in msgs if m.HasField("values")]
        return api.ExportChunk(ids=_cat([wire.decode(m.ids, "ids") for m in msgs]),
                               keys=_cat([wire.decode(m.keys, "keys") for m in msgs]),
                               values=_opt(values))
