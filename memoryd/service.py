"""The gRPC service: thin handlers over a MemoryBackend.

Every handler decodes the request (memoryd.wire), makes ONE backend call and
encodes the reply; no FAISS and no SQL here. Errors are mapped to status
codes in one place, `_rpc`:

  * a domain error (memoryd.errors.MemoryError) aborts with its own status
    code and message, plus a google.rpc.ErrorInfo whose `reason` names the
    exact class (so MemoryClient can raise BankFrozen, not just
    FailedPrecondition); QuotaExceeded also carries a QuotaFailure and the
    used/limit/requested numbers in the ErrorInfo metadata;
  * anything else is a bug: it is logged with its traceback and answered
    INTERNAL, and the daemon keeps serving.

Streams: Add, Append and UpdateValues are client-streaming; their chunks
are concatenated and applied with one backend call, so a write is all or
nothing. Search, Get and Export are server-streaming; replies are cut into
messages of about wire.CHUNK_BYTES.

Clients name themselves in the metadata `x-memoryd-client` (else the peer
address stands in); Search hands that name to backends whose search takes a
`client` keyword, so Stats.stacks can say who searched which stack.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from memoryd import api, errors, fastwire, shm, wire
from memoryd.errors import InvalidArgument
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc

log = logging.getLogger("memoryd.rpc")

# ---- errors: the one place that maps exceptions to status codes ------------

def _details_status(err: errors.MemoryError) -> status_pb2.Status:
    """google.rpc.Status for a domain error: code, message and details."""
    code = grpc.StatusCode[err.code]
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []
    if isinstance(err, errors.QuotaExceeded):
        metadata = {"bank": err.bank, "used": str(err.used), "limit": str(err.limit),
                    "requested": str(err.requested), "scope": err.scope}
        failure = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"{err.scope}:{err.bank}",
                description=f"used {err.used} B + requested {err.requested} B "
                            f"> limit {err.limit} B")])
        details.append(_pack(failure))
    info = error_details_pb2.ErrorInfo(
        reason=errors.reason(type(err)), domain=errors.ERROR_DOMAIN, metadata=metadata)
    details.insert(0, _pack(info))
    return status_pb2.Status(code=code.value[0], message=str(err), details=details)


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _code_name(context: grpc.ServicerContext, exc: BaseException) -> str:
    """The status an exception is answered with."""
    if not context.is_active() or isinstance(exc, grpc.RpcError):
        return "CANCELLED"      # the client went away (its request stream raises RpcError)
    if isinstance(exc, errors.MemoryError) and exc.code in grpc.StatusCode.__members__:
        return exc.code
    return "INTERNAL"


def _abort(context: grpc.ServicerContext, method: str, code: str, exc: BaseException) -> None:
    """Abort the call for exc; raises (grpc's abort always does)."""
    if code == "CANCELLED":
        context.abort(grpc.StatusCode.CANCELLED, f"{method} cancelled by the client")
    if code != "INTERNAL":
        context.abort_with_status(rpc_status.to_status(_details_status(exc)))
    log.error("rpc failed with an unexpected error", exc_info=exc,
              extra={"fields": {"method": method, "error": f"{type(exc).__name__}: {exc}"}})
    context.abort(grpc.StatusCode.INTERNAL,
                  f"internal error in {method}: {type(exc).__name__}: {exc}")


def _rpc(fn: Callable) -> Callable:
    """Wrap a handler: map exceptions (also those raised mid-stream), log at debug."""
    method = fn.__name__

    def done(t0: float, code: str, exc: BaseException | None = None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            fields = {"method": method, "code": code,
                      "ms": round((time.perf_counter() - t0) * 1e3, 3)}
            if exc is not None:
                fields["error"] = str(exc)
            log.debug("rpc", extra={"fields": fields})

    def failed(t0: float, context, exc: Exception) -> None:
        code = _code_name(context, exc)
        done(t0, code, exc)
        _abort(context, method, code, exc)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            t0 = time.perf_counter()
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                failed(t0, context, exc)
            done(t0, "OK")
        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        t0 = time.perf_counter()
        try:
            reply = fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            failed(t0, context, exc)
        done(t0, "OK")
        return reply
    return unary


# ---- request helpers ---------------------------------------------------------

def _required(msg, field: str, what: str) -> np.ndarray:
    if not msg.HasField(field):
        raise InvalidArgument(f"{what} missing from the request")
    return wire.decode(getattr(msg, field), what)


def _search_queries(request: pb.SearchRequest, buf: shm.ReplyBufferFile | None) -> np.ndarray:
    """The queries: from the message, or copied out of the reply buffer (before the
    reply is written over them)."""
    t = request.queries
    if not (request.HasField("queries") and t.HasField("buffer_offset")):
        return _required(request, "queries", "queries")
    if buf is None:
        raise InvalidArgument("queries: a buffer offset, but no reply_buffer named")
    if t.dtype not in wire._FROM_PB or len(t.data):
        raise InvalidArgument("queries: a buffer offset needs a dtype and no data")
    wire.check_shape(tuple(t.shape), "queries")
    with buf.lock:
        return buf.read(shm.Placed(wire._FROM_PB[t.dtype], tuple(t.shape), t.buffer_offset))


def _concat(parts: list[np.ndarray], what: str) -> np.ndarray:
    """Rows of all chunks as one array; chunks must agree on dtype and row shape."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if p.ndim == 0 or first.ndim == 0 or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
            raise InvalidArgument(
                f"{what}: chunk {i} has {p.dtype.name} {p.shape}, but chunk 0 has "
                f"{first.dtype.name} {first.shape}; chunks must agree on dtype and row shape")
    return np.concatenate(parts)


def _collect(requests: Iterable, rpc: str, required: tuple[str, ...],
             optional: tuple[str, ...], target: str = "bank"
             ) -> tuple[str, dict[str, np.ndarray | None]]:
    """Read a client stream: (bank, {field: concatenated rows or None}).

    `target` is the field that names what the stream writes to ("bank", or
    "session_id" for Append).
    """
    bank = None
    noun = target.removesuffix("_id")
    parts: dict[str, list[np.ndarray]] = {f: [] for f in required + optional}
    n = 0
    for n, msg in enumerate(requests, 1):
        name = getattr(msg, target)
        if bank is None:
            if not name:
                raise InvalidArgument(f"{rpc}: the first message must name the {noun}")
            bank = name
        elif name and name != bank:
            raise InvalidArgument(
                f"{rpc}: message {n - 1} names {noun} '{name}' but the stream "
                f"is for {noun} '{bank}'")
        for f in required:
            parts[f].append(_required(msg, f, f"{f} (message {n - 1})"))
        for f in optional:
            if msg.HasField(f):
                parts[f].append(wire.decode(getattr(msg, f), f"{f} (message {n - 1})"))
    if bank is None:
        raise InvalidArgument(f"{rpc}: empty request stream; send at least one message")
    out: dict[str, np.ndarray | None] = {}
    for f, chunks in parts.items():
        if chunks and len(chunks) != n:
            raise InvalidArgument(
                f"{rpc}: {f} present in {len(chunks)} of {n} messages; "
                "send it in every message or in none")
        out[f] = _concat(chunks, f) if chunks else None
    return bank, out


def _client_name(context: grpc.ServicerContext) -> str:
    """Who is calling: the x-memoryd-client metadata, else the peer address."""
    for key, value in context.invocation_metadata() or ():
        if key == wire.CLIENT_METADATA and value:
            return value
    return context.peer()


def _takes_client(backend) -> bool:
    """Whether backend.search accepts a `client` keyword."""
    try:
        params = inspect.signature(backend.search).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "client" in params


def _row_bytes(*arrays: np.ndarray | None) -> int:
    """Bytes of one leading-axis row over several arrays."""
    return sum(a[:1].nbytes if len(a) else 0 for a in arrays if a is not None)


def _sliced(a: np.ndarray | None, s: slice) -> np.ndarray | None:
    return None if a is None else a[s]


def _maybe(a: np.ndarray | None, s: slice) -> pb.Tensor | None:
    return None if a is None else wire.encode(a[s])


# ---- the service ---------------------------------------------------------------

class MemoryServicer(pb_grpc.MemoryServicer):
    """memoryd.v1.Memory over any MemoryBackend."""

    def __init__(self, backend: api.MemoryBackend, buffers: shm.ReplyBuffers | None = None):
        self.backend = backend
        self.buffers = buffers if buffers is not None else shm.ReplyBuffers(None)  # None: off
        self._search_takes_client = _takes_client(backend)   # inspected once

    # banks
    @_rpc
    def CreateBank(self, request, context):
        return wire.info_to_pb(self.backend.create_bank(wire.spec_from_pb(request.spec)))

    @_rpc
    def GetBank(self, request, context):
        return wire.info_to_pb(self.backend.bank_info(request.name))

    @_rpc
    def ListBanks(self, request, context):
        banks = self.backend.list_banks(request.tenant or None)
        return pb.ListBanksResponse(banks=[wire.info_to_pb(b) for b in banks])

    @_rpc
    def DeleteBank(self, request, context):
        return pb.DeleteBankResponse(released_bytes=self.backend.delete_bank(request.name))

    @_rpc
    def FreezeBank(self, request, context):
        return wire.info_to_pb(self.backend.freeze_bank(request.name))

    @_rpc
    def SetQuota(self, request, context):
        info = self.backend.set_quota(request.name, wire.quota_from_pb(request.quota_bytes))
        return wire.info_to_pb(info)

    @_rpc
    def SetTier(self, request, context):
        return wire.info_to_pb(self.backend.set_tier(request.name, request.tier))

    # data
    @_rpc
    def Add(self, request_iterator, context):
        bank, a = _collect(request_iterator, "Add", ("keys",), ("values", "ids"))
        ids = self.backend.add(bank, a["keys"], a["values"], a["ids"])
        return pb.AddResponse(ids=wire.encode(np.asarray(ids, dtype=np.int64)))

    @_rpc
    def UpdateValues(self, request_iterator, context):
        bank, a = _collect(request_iterator, "UpdateValues", ("ids", "values"), ())
        return pb.UpdateValuesResponse(
            updated=self.backend.update_values(bank, a["ids"], a["values"]))

    @_rpc
    def Remove(self, request, context):
        ids = _required(request, "ids", "ids")
        return pb.RemoveResponse(removed=self.backend.remove(request.bank, ids))

    @_rpc
    def Search(self, request, context) -> Iterator[pb.SearchResponse]:
        banks = ([wire.bank_query_from_pb(q) for q in request.stack] if request.stack
                 else list(request.banks))
        extra = {"client": _client_name(context)} if self._search_takes_client else {}
        buf = self.buffers.get(request.reply_buffer) if request.reply_buffer else None
        queries = _search_queries(request, buf)
        r = self.backend.search(banks, queries, request.k, values=request.values,
                                keys=request.keys, **extra)
        if buf is not None:
            with buf.lock:
                placed = buf.place({"ids": r.ids, "scores": r.scores, "bank": r.bank,
                                    "values": r.values, "keys": r.keys})
            if placed is not None:       # else too small: inline, the client grows it
                yield fastwire.encode(pb.SearchResponse, offset=0, **placed)
                return
        rows = _row_bytes(r.ids, r.scores, r.bank, r.values, r.keys)
        for s in wire.chunk_slices(len(r.ids), rows):
            # already serialised (see SEARCH_HANDLER): the reply's arrays are
            # copied once, straight into the message bytes
            yield fastwire.encode(
                pb.SearchResponse, offset=s.start, ids=r.ids[s], scores=r.scores[s],
                bank=r.bank[s], values=_sliced(r.values, s), keys=_sliced(r.keys, s))

    @_rpc
    def Get(self, request, context) -> Iterator[pb.GetResponse]:
        ids = _required(request, "ids", "ids")
        r = self.backend.get(request.bank, ids, values=request.values, keys=request.keys)
        found = np.asarray(r.found).astype(np.int32)
        for s in wire.chunk_slices(len(found), _row_bytes(found, r.values, r.keys)):
            yield pb.GetResponse(offset=s.start, found=wire.encode(found[s]),
                                 values=_maybe(r.values, s), keys=_maybe(r.keys, s))

    @_rpc
    def Export(self, request, context) -> Iterator[pb.ExportChunk]:
        # 0 means "server default"; the backend refuses a negative count.
        chunks = (self.backend.export(request.bank, request.chunk_rows) if request.chunk_rows
                  else self.backend.export(request.bank))
        for c in chunks:
            # A backend chunk may be far above CHUNK_BYTES: re-cut it.
            for s in wire.chunk_slices(len(c.ids), _row_bytes(c.ids, c.keys, c.values)):
                if s.stop > s.start:
                    yield pb.ExportChunk(ids=wire.encode(c.ids[s]), keys=wire.encode(c.keys[s]),
                                         values=_maybe(c.values, s))

    # sessions
    @_rpc
    def OpenSession(self, request, context):
        spec = wire.session_spec_from_pb(request.spec)
        return wire.session_to_pb(self.backend.open_session(spec))

    @_rpc
    def Append(self, request_iterator, context):
        session, a = _collect(request_iterator, "Append", ("keys",), ("values", "scores"),
                              target="session_id")
        ids = self.backend.append(session, a["keys"], a["values"], a["scores"])
        return pb.AppendResponse(ids=wire.encode(np.asarray(ids, dtype=np.int64)))

    @_rpc
    def GetSession(self, request, context):
        return wire.session_to_pb(self.backend.session_info(request.session_id))

    @_rpc
    def ListSessions(self, request, context):
        sessions = self.backend.list_sessions(request.tenant or None)
        return pb.ListSessionsResponse(sessions=[wire.session_to_pb(s) for s in sessions])

    @_rpc
    def ExtendSession(self, request, context):
        info = self.backend.extend_session(
            request.session_id, ttl_idle_s=wire.optional_from_pb(request, "ttl_idle_s"),
            ttl_absolute_s=wire.optional_from_pb(request, "ttl_absolute_s"))
        return wire.session_to_pb(info)

    @_rpc
    def CloseSession(self, request, context):
        return pb.CloseSessionResponse(
            released_bytes=self.backend.close_session(request.session_id))

    @_rpc
    def PromoteSession(self, request, context):
        r = self.backend.promote_session(
            request.session_id, request.target, ids=wire.maybe_decode(request, "ids"),
            min_score=wire.optional_from_pb(request, "min_score"),
            dedup=wire.optional_from_pb(request, "dedup"), move=request.move)
        return wire.promote_to_pb(r)

    # tenants
    @_rpc
    def SetTenantQuota(self, request, context):
        info = self.backend.set_tenant_quota(request.tenant,
                                             wire.quota_from_pb(request.quota_bytes))
        return wire.tenant_to_pb(info)

    @_rpc
    def GetTenant(self, request, context):
        return wire.tenant_to_pb(self.backend.tenant_info(request.name))

    @_rpc
    def ListTenants(self, request, context):
        return pb.ListTenantsResponse(
            tenants=[wire.tenant_to_pb(t) for t in self.backend.list_tenants()])

    # daemon
    @_rpc
    def Stats(self, request, context):
        return wire.stats_to_pb(self.backend.stats())

    @_rpc
    def Ping(self, request, context):
        return pb.PingResponse(payload=request.payload)

    # reply buffers (memoryd/shm.py)
    @_rpc
    def OpenReplyBuffer(self, request, context):
        b = self.buffers.open(request.size_bytes)
        return pb.ReplyBuffer(handle=b.handle, path=str(b.path), size_bytes=b.size,
                              data_offset=shm.HEADER, idle_timeout_s=self.buffers.idle_s)

    @_rpc
    def CloseReplyBuffer(self, request, context):
        self.buffers.close(request.handle)
        return pb.CloseReplyBufferResponse()


class _HandlerTable:
    """Stands in for a grpc.Server to catch the generated handler table."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_to_server(servicer: MemoryServicer, server: grpc.Server) -> None:
    """Register memoryd.v1.Memory: the generated handlers, except that Search
    sends the bytes fastwire already serialised (same wire format)."""
    table = _HandlerTable()
    pb_grpc.add_MemoryServicer_to_server(servicer, table)
    handlers = table.handlers
    handlers["Search"] = grpc.unary_stream_rpc_method_handler(
        servicer.Search, request_deserializer=pb.SearchRequest.FromString,
        response_serializer=bytes)
    service = pb.DESCRIPTOR.services_by_name["Memory"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
