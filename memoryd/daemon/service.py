"""The gRPC service: thin handlers over a MemoryBackend.

Every handler decodes the request (memoryd.wire), makes ONE backend call
with the caller's identity and encodes the reply; no FAISS and no SQL here.
Errors are mapped in one place, `_rpc`, through the wire's status codec
(memoryd.wire.status):

  * a domain error (memoryd.errors.MemorydError) aborts with its own status
    code, message and details (ErrorInfo, QuotaFailure);
  * a client that went away is CANCELLED;
  * anything else is a bug: it is logged with its traceback and answered
    INTERNAL, and the daemon keeps serving.

Callers name themselves in the metadata `x-memoryd-client` (else the peer
address stands in); every backend call gets that `Caller`. With auth on
(`memoryd serve --auth`, an Authenticator) the Caller also carries the
tenant and rights of the call's token (metadata `authorization: Bearer
<token>`), and a call without a valid one is UNAUTHENTICATED before its
handler runs; the backend enforces the rights (memoryd.auth.rights). A reply
buffer belongs to the token that opened it: another token's handle is
unknown to it.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Callable, Iterator

import grpc
import numpy as np

from memoryd import api
from memoryd.api import Caller
from memoryd.auth import callers
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc
from memoryd.wire import messages as msg
from memoryd.wire import search as search_wire
from memoryd.wire import shm, status, streams
from memoryd.wire import tokens as token_wire
from memoryd.wire.channel import AUTH_METADATA, CLIENT_METADATA
from memoryd.wire.tensors import encode, maybe_decode, required

log = logging.getLogger("memoryd.rpc")


# ---- errors: the one place that maps exceptions to status codes ------------

def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    """Abort the call for exc: always raises (grpc's abort does)."""
    if not context.is_active() or isinstance(exc, grpc.RpcError):
        # the client went away (its request stream raises RpcError)
        context.abort(grpc.StatusCode.CANCELLED, f"{method} cancelled by the client")
    code = status.code_name(exc)
    if code != "INTERNAL":
        context.abort_with_status(status.to_status(exc))
    log.error("rpc failed with an unexpected error", exc_info=exc,
              extra={"fields": {"method": method, "error": f"{type(exc).__name__}: {exc}"}})
    context.abort(grpc.StatusCode.INTERNAL,
                  f"internal error in {method}: {type(exc).__name__}: {exc}")


def _rpc(fn: Callable) -> Callable:
    """Wrap a handler: hand it the Caller, map exceptions (also those raised
    mid-stream), log at debug."""
    method = fn.__name__

    def done(t0: float, code: str, exc: BaseException | None = None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            fields = {"method": method, "code": code,
                      "ms": round((time.perf_counter() - t0) * 1e3, 3)}
            if exc is not None:
                fields["error"] = str(exc)
            log.debug("rpc", extra={"fields": fields})

    def failed(t0: float, context, exc: Exception) -> None:
        cancelled = not context.is_active() or isinstance(exc, grpc.RpcError)
        done(t0, "CANCELLED" if cancelled else status.code_name(exc), exc)
        _abort(context, method, exc)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            t0 = time.perf_counter()
            try:
                yield from fn(self, request, context, self._caller(context))
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                failed(t0, context, exc)
            done(t0, "OK")
        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        t0 = time.perf_counter()
        try:
            reply = fn(self, request, context, self._caller(context))
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            failed(t0, context, exc)
        done(t0, "OK")
        return reply
    return unary


def _client_name(metadata) -> str | None:
    """The x-memoryd-client metadata, if any."""
    for key, value in metadata:
        if key == CLIENT_METADATA and value:
            return value
    return None


def _bearer(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata:
        if key == AUTH_METADATA and isinstance(value, str):
            scheme, _, rest = value.strip().partition(" ")
            return rest.strip() if scheme.lower() == "bearer" else ""
    return None


def _ids(ids) -> pb.Tensor:
    return encode(np.asarray(ids, dtype=np.int64))


def _maybe(a: np.ndarray | None, s: slice) -> pb.Tensor | None:
    return None if a is None else encode(a[s])


# ---- the service ---------------------------------------------------------------

class MemoryServicer(pb_grpc.MemoryServicer):
    """memoryd.v1.Memory over any MemoryBackend."""

    def __init__(self, backend: api.MemoryBackend, buffers: shm.ReplyBuffers | None = None,
                 auth: callers.Authenticator | None = None):
        """auth: check every call's token (None: auth off, every caller is the owner)."""
        self.backend = backend
        self.buffers = buffers if buffers is not None else shm.ReplyBuffers(None)  # None: off
        self.auth = auth

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        """Who is calling (x-memoryd-client, else the peer address) and, with
        auth on, what its token allows (Unauthenticated without a valid one)."""
        metadata = tuple(context.invocation_metadata() or ())
        name = _client_name(metadata) or context.peer()
        if self.auth is None:   # the token, if any, travels on (a router's shards check it)
            return Caller(name, credential=_bearer(metadata) or None)
        return self.auth.caller(_bearer(metadata), name)

    # admin plane
    @_rpc
    def CreateBank(self, request, context, caller):
        spec = msg.spec_from_pb(request.spec)
        return msg.info_to_pb(self.backend.create_bank(spec, caller=caller))

    @_rpc
    def GetBank(self, request, context, caller):
        return msg.info_to_pb(self.backend.bank_info(request.name, caller=caller))

    @_rpc
    def ListBanks(self, request, context, caller):
        banks = self.backend.list_banks(request.tenant or None, caller=caller)
        return pb.ListBanksResponse(banks=[msg.info_to_pb(b) for b in banks])

    @_rpc
    def DeleteBank(self, request, context, caller):
        released = self.backend.delete_bank(request.name, caller=caller)
        return pb.DeleteBankResponse(released_bytes=released)

    @_rpc
    def FreezeBank(self, request, context, caller):
        return msg.info_to_pb(self.backend.freeze_bank(request.name, caller=caller))

    @_rpc
    def SetQuota(self, request, context, caller):
        quota = msg.quota_from_pb(request.quota_bytes)
        return msg.info_to_pb(self.backend.set_quota(request.name, quota, caller=caller))

    @_rpc
    def SetTier(self, request, context, caller):
        return msg.info_to_pb(self.backend.set_tier(request.name, request.tier, caller=caller))

    @_rpc
    def Stats(self, request, context, caller):
        return msg.stats_to_pb(self.backend.stats(caller=caller))

    # data plane
    @_rpc
    def Add(self, request_iterator, context, caller):
        bank, a, head = streams.collect(request_iterator, "Add", ("keys",), ("values", "ids"))
        ids = self.backend.add(bank, a["keys"], a["values"], a["ids"],
                               ack=msg.ack_from_pb(head.ack), caller=caller)
        return pb.AddResponse(ids=_ids(ids))

    @_rpc
    def UpdateValues(self, request_iterator, context, caller):
        bank, a, head = streams.collect(request_iterator, "UpdateValues", ("ids", "values"), ())
        updated = self.backend.update_values(bank, a["ids"], a["values"],
                                             ack=msg.ack_from_pb(head.ack), caller=caller)
        return pb.UpdateValuesResponse(updated=updated)

    @_rpc
    def Remove(self, request, context, caller):
        ids = required(request, "ids", "ids")
        return pb.RemoveResponse(removed=self.backend.remove(
            request.bank, ids, ack=msg.ack_from_pb(request.ack), caller=caller))

    @_rpc
    def Search(self, request, context, caller) -> Iterator[bytes]:
        # already serialised (see add_to_server): the payload is copied once
        r, buf = self._search(request, caller)
        yield from search_wire.encode_reply(r, buf)

    @_rpc
    def SearchOne(self, request, context, caller) -> bytes:
        # Search's reply as ONE message (serialised too), or ReplyTooLarge
        r, buf = self._search(request, caller)
        return search_wire.encode_one(r, buf)

    def _search(self, request: pb.SearchRequest, caller: Caller
                ) -> tuple[api.SearchResult, shm.ReplyBufferFile | None]:
        c = search_wire.decode_request(request, self.buffers, owner=caller.token_id)
        r = self.backend.search(c.stack, c.queries, c.k, values=c.values, keys=c.keys,
                                caller=caller)
        return r, c.buffer

    @_rpc
    def Get(self, request, context, caller) -> Iterator[pb.GetResponse]:
        ids = required(request, "ids", "ids")
        r = self.backend.get(request.bank, ids, values=request.values, keys=request.keys,
                             caller=caller)
        found = np.asarray(r.found).astype(np.int32)
        for s in streams.chunk_slices(len(found), streams.row_bytes(found, r.values, r.keys)):
            yield pb.GetResponse(offset=s.start, found=encode(found[s]),
                                 values=_maybe(r.values, s), keys=_maybe(r.keys, s))

    @_rpc
    def Export(self, request, context, caller) -> Iterator[pb.ExportChunk]:
        # 0 means "server default"; the backend refuses a negative count.
        chunks = self.backend.export(request.bank, request.chunk_rows or api.CHUNK_ROWS,
                                     caller=caller)
        for c in chunks:
            # A backend chunk may be far above a stream piece: re-cut it.
            for s in streams.chunk_slices(len(c.ids), streams.row_bytes(c.ids, c.keys, c.values)):
                if s.stop > s.start:
                    yield pb.ExportChunk(ids=encode(c.ids[s]), keys=encode(c.keys[s]),
                                         values=_maybe(c.values, s))

    # session plane
    @_rpc
    def OpenSession(self, request, context, caller):
        spec = msg.session_spec_from_pb(request.spec)
        return msg.session_to_pb(self.backend.open_session(spec, caller=caller))

    @_rpc
    def Append(self, request_iterator, context, caller):
        session, a, head = streams.collect(request_iterator, "Append", ("keys",), ("values", "scores"),
                                     target="session_id")
        ids = self.backend.append(session, a["keys"], a["values"], a["scores"],
                                  ack=msg.ack_from_pb(head.ack), caller=caller)
        return pb.AppendResponse(ids=_ids(ids))

    @_rpc
    def GetSession(self, request, context, caller):
        return msg.session_to_pb(self.backend.session_info(request.session_id, caller=caller))

    @_rpc
    def ListSessions(self, request, context, caller):
        sessions = self.backend.list_sessions(request.tenant or None, caller=caller)
        return pb.ListSessionsResponse(sessions=[msg.session_to_pb(s) for s in sessions])

    @_rpc
    def ExtendSession(self, request, context, caller):
        info = self.backend.extend_session(
            request.session_id, ttl_idle_s=msg.optional_from_pb(request, "ttl_idle_s"),
            ttl_absolute_s=msg.optional_from_pb(request, "ttl_absolute_s"), caller=caller)
        return msg.session_to_pb(info)

    @_rpc
    def CloseSession(self, request, context, caller):
        released = self.backend.close_session(request.session_id, caller=caller)
        return pb.CloseSessionResponse(released_bytes=released)

    @_rpc
    def PromoteSession(self, request, context, caller):
        r = self.backend.promote_session(
            request.session_id, request.target, ids=maybe_decode(request, "ids"),
            min_score=msg.optional_from_pb(request, "min_score"),
            dedup=msg.optional_from_pb(request, "dedup"), move=request.move,
            ack=msg.ack_from_pb(request.ack), caller=caller)
        return msg.promote_to_pb(r)

    # backup plane
    @_rpc
    def SnapshotBank(self, request, context, caller):
        return msg.snapshot_to_pb(self.backend.snapshot_bank(request.name, request.path,
                                                             caller=caller))

    @_rpc
    def RestoreBank(self, request, context, caller):
        return msg.info_to_pb(self.backend.restore_bank(request.path, request.name or None,
                                                        caller=caller))

    @_rpc
    def Backup(self, request, context, caller):
        return msg.snapshot_to_pb(self.backend.backup(request.path, caller=caller))

    # tenant plane
    @_rpc
    def SetTenantQuota(self, request, context, caller):
        quota = msg.quota_from_pb(request.quota_bytes)
        return msg.tenant_to_pb(self.backend.set_tenant_quota(request.tenant, quota,
                                                              caller=caller))

    @_rpc
    def GetTenant(self, request, context, caller):
        return msg.tenant_to_pb(self.backend.tenant_info(request.name, caller=caller))

    @_rpc
    def ListTenants(self, request, context, caller):
        tenants = self.backend.list_tenants(caller=caller)
        return pb.ListTenantsResponse(tenants=[msg.tenant_to_pb(t) for t in tenants])

    # the daemon itself
    @_rpc
    def Ping(self, request, context, caller):
        return pb.PingResponse(payload=request.payload)

    @_rpc
    def OpenReplyBuffer(self, request, context, caller):
        buf = self.buffers.open(request.size_bytes, owner=caller.token_id)
        return shm.to_pb(buf, self.buffers.idle_s)

    @_rpc
    def CloseReplyBuffer(self, request, context, caller):
        self.buffers.close(request.handle, owner=caller.token_id)
        return pb.CloseReplyBufferResponse()

    # token plane (admin; the backend checks)
    @_rpc
    def CreateToken(self, request, context, caller):
        created = self.backend.create_token(request.tenant or None, request.role or "write",
                                            request.name, caller=caller)
        return token_wire.created_to_pb(created)

    @_rpc
    def ListTokens(self, request, context, caller):
        infos = self.backend.list_tokens(request.tenant or None, caller=caller)
        return pb.ListTokensResponse(tokens=[token_wire.token_to_pb(t) for t in infos])

    @_rpc
    def RevokeToken(self, request, context, caller):
        return token_wire.token_to_pb(self.backend.revoke_token(request.id, caller=caller))


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
    and SearchOne send the bytes fastwire already serialised (same wire format)."""
    table = _HandlerTable()
    pb_grpc.add_MemoryServicer_to_server(servicer, table)
    handlers = table.handlers
    handlers["Search"] = grpc.unary_stream_rpc_method_handler(
        servicer.Search, request_deserializer=pb.SearchRequest.FromString,
        response_serializer=bytes)
    handlers["SearchOne"] = grpc.unary_unary_rpc_method_handler(
        servicer.SearchOne, request_deserializer=pb.SearchRequest.FromString,
        response_serializer=bytes)
    service = pb.DESCRIPTOR.services_by_name["Memory"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
