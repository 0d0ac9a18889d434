"""MemoryClient: the MemoryBackend interface over gRPC to a memoryd daemon.

    with MemoryClient("unix:///run/memoryd/memoryd.sock") as mem:
        mem.add("wiki", keys, values)
        r = mem.search(["wiki"], queries, k=32)

A mirror of the daemon's servicer, built from the same wire parts
(memoryd.wire): each method encodes its request, makes one call and decodes
the reply. Results have the same types, dtypes and shapes as LocalMemory's,
and errors come back as the same memoryd.errors classes (the wire's status
codec: the server's ErrorInfo names the exact class; QuotaExceeded is
rebuilt with .used/.limit/.requested).

Inputs may be numpy arrays, torch tensors (any device) or nested lists. The
client converts only where that is cheap and loses nothing the server would
keep: keys and queries go as float32, ids as int64, values as given when the
wire carries their dtype (float32/float16/bfloat16) and as float32 otherwise
(e.g. float64); the server casts values to the bank's value dtype, exactly as
LocalMemory does, and validates everything (shapes, dims, NaN, ...), so the
messages are the same from both backends.

Search replies from a daemon on the same host come through shared memory
(reply buffers, memoryd.wire.shm): by default whenever the address is a unix
socket; `reply_buffers=True` also tries it over TCP (loopback), False never.
A search whose reply predictably fits one message (decode-sized ones) is one
unary call, SearchOne; others stream (Search), as do all searches to a
daemon older than SearchOne (memoryd.wire.search.Route). Results are the
same either way.

The client names itself to the daemon (metadata `x-memoryd-client`, default
"<hostname>:<pid>"); a call's `caller=` names someone else for that call
(e.g. a router forwarding its own clients' requests).

Security: `token=` (an API token, `memctl token create`) goes with every call
as `authorization: Bearer <token>`, required by a daemon run with --auth; a
caller= names someone else but keeps the client's token, except a caller that
carries its own (`Caller.credential`: a router forwarding the token its caller
sent, which the shards then check), so it never elevates past what the caller
itself holds. `tls=`
(a ClientTLS: the CA, and a client cert for mutual TLS) dials TCP with TLS.
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

from memoryd import api, errors
from memoryd.api import Caller
from memoryd.arrays import BFLOAT16, to_numpy
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc
from memoryd.wire import fastwire, status, streams
from memoryd.wire import messages as msg
from memoryd.wire import search as search_wire
from memoryd.wire.channel import AUTH_METADATA, CLIENT_METADATA, CLIENT_OPTIONS, grpc_target
from memoryd.wire.reply_pool import ReplyBufferPool
from memoryd.wire.tensors import decode, encode
from memoryd.wire import tokens as token_wire
from memoryd.wire.tls import ClientTLS, secure_channel

_WIRE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


def _mapped(fn: Callable) -> Callable:
    """Raise memoryd.errors instead of grpc.RpcError, also while a stream is read."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except grpc.RpcError as e:
                raise status.to_error(e, self.address) from None
        return gen

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except grpc.RpcError as e:
            raise status.to_error(e, self.address) from None
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


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if token is None:
        return ()
    token = token.strip() if isinstance(token, str) else token
    if not isinstance(token, str) or not token or not all(" " < c <= "~" for c in token):
        raise errors.InvalidArgument("token must be printable ASCII without spaces "
                                     "(mdt_<id>_<secret>)")
    return ((AUTH_METADATA, f"Bearer {token}"),)


def _opt_float(x: Any, what: str) -> float | None:
    """None, or x as a float for a proto3 `optional double` (the server validates it)."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise errors.InvalidArgument(f"{what} must be a number or None; got {x!r}")
    return float(x)


class MemoryClient:
    """A MemoryBackend that talks to memoryd over gRPC."""

    def __init__(self, address: str, *, timeout: float | None = None, wait_ready: float = 10.0,
                 client_name: str | None = None, reply_buffers: bool | None = None,
                 token: str | None = None, tls: ClientTLS | None = None):
        self.address = address
        self.timeout = timeout
        self.client_name = _client_name(client_name)
        self._auth = _auth_metadata(token)
        self._channel = (secure_channel(grpc_target(address), tls, CLIENT_OPTIONS)
                         if tls is not None
                         else grpc.insecure_channel(grpc_target(address), options=CLIENT_OPTIONS))
        self._stub = pb_grpc.MemoryStub(self._channel)
        # Search replies are read by fastwire: zero-copy views of the message
        # bytes instead of protobuf objects (the same wire format).
        reply = functools.partial(fastwire.decode, pb.SearchResponse)
        self._search = self._channel.unary_stream(
            search_wire.METHOD, request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=reply, _registered_method=True)
        self._search_one = self._channel.unary_unary(
            search_wire.ONE_METHOD, request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=reply, _registered_method=True)
        self._route = search_wire.Route()        # SearchOne or Search, per search
        if reply_buffers is None:                # same host for sure: a unix socket
            reply_buffers = grpc_target(address).startswith("unix:")
        self._buffers = (ReplyBufferPool(self._open_reply_buffer, self._close_reply_buffer)
                         if reply_buffers else None)
        if wait_ready:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=wait_ready)
            except grpc.FutureTimeoutError:
                self._channel.close()
                raise errors.Unavailable(
                    f"no memoryd answering at {address} after {wait_ready:g} s") from None

    @staticmethod
    def sharded(addresses: Sequence[str], *, partial_results: bool = False,
                **options: Any) -> api.MemoryBackend:
        """One memory over shard processes (`memoryd serve --shard-index i`),
        routed in this process: what `memoryd route` does, without its hop.

            mem = MemoryClient.sharded(["10.0.0.1:7070", "10.0.0.2:7070"], token=t)

        options go to each shard's MemoryClient (timeout, token, tls, ...);
        see memoryd.cluster.sharded for placement and the failure policy."""
        from memoryd.cluster import ShardedMemory

        options.setdefault("wait_ready", 0)      # a shard that is down fails only what needs it
        clients = [MemoryClient(a, **options) for a in addresses]
        return ShardedMemory(clients, names=list(addresses), partial_results=partial_results)

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

    def _opts(self, caller: Caller | None = None) -> dict[str, Any]:
        """Keyword arguments of every call: the timeout and who is calling."""
        name = self.client_name if caller is None else _client_name(caller.name)
        auth = self._auth
        if caller is not None and caller.credential:   # a router forwarding its caller's token
            auth = _auth_metadata(caller.credential)
        return {"timeout": self.timeout, "metadata": ((CLIENT_METADATA, name), *auth)}

    @_mapped
    def ping(self, payload: bytes = b"") -> bytes:
        return self._stub.Ping(pb.PingRequest(payload=payload), **self._opts()).payload

    # -- admin plane
    @_mapped
    def create_bank(self, spec: api.BankSpec, *, caller: Caller | None = None) -> api.BankInfo:
        # The shared check, here because the wire cannot carry a bad spec: an
        # unknown kind or metric would arrive unset and become the default.
        spec.validated()
        req = pb.CreateBankRequest(spec=msg.spec_to_pb(spec))
        return msg.info_from_pb(self._stub.CreateBank(req, **self._opts(caller)))

    @_mapped
    def bank_info(self, name: str, *, caller: Caller | None = None) -> api.BankInfo:
        return msg.info_from_pb(self._stub.GetBank(pb.BankRef(name=name), **self._opts(caller)))

    @_mapped
    def list_banks(self, tenant: str | None = None, *,
                   caller: Caller | None = None) -> list[api.BankInfo]:
        reply = self._stub.ListBanks(pb.ListBanksRequest(tenant=tenant or ""), **self._opts(caller))
        return [msg.info_from_pb(b) for b in reply.banks]

    @_mapped
    def delete_bank(self, name: str, *, caller: Caller | None = None) -> int:
        return self._stub.DeleteBank(pb.BankRef(name=name), **self._opts(caller)).released_bytes

    @_mapped
    def freeze_bank(self, name: str, *, caller: Caller | None = None) -> api.BankInfo:
        return msg.info_from_pb(self._stub.FreezeBank(pb.BankRef(name=name), **self._opts(caller)))

    @_mapped
    def set_quota(self, name: str, quota_bytes: int | None, *,
                  caller: Caller | None = None) -> api.BankInfo:
        req = pb.SetQuotaRequest(name=name, quota_bytes=msg.quota_to_pb(quota_bytes))
        return msg.info_from_pb(self._stub.SetQuota(req, **self._opts(caller)))

    @_mapped
    def set_tier(self, name: str, tier: str, *, caller: Caller | None = None) -> api.BankInfo:
        if not isinstance(tier, str):   # any string travels; the daemon names a bad one
            raise errors.InvalidArgument(
                f"tier must be one of {', '.join(api.TIERS)}; got {tier!r}")
        req = pb.SetTierRequest(name=name, tier=tier)
        return msg.info_from_pb(self._stub.SetTier(req, **self._opts(caller)))

    @_mapped
    def stats(self, *, caller: Caller | None = None) -> api.Stats:
        return msg.stats_from_pb(self._stub.Stats(pb.StatsRequest(), **self._opts(caller)))

    # -- data plane
    @_mapped
    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None, *,
            ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        arrays = {"keys": _as_float32(keys),
                  "values": None if values is None else _as_values(values),
                  "ids": None if ids is None else _as_ids(ids)}
        requests = streams.write_stream(pb.AddRequest, "bank", bank, arrays,
                                        ack=msg.ack_to_pb(ack))
        reply = self._stub.Add(requests, **self._opts(caller))
        return decode(reply.ids, "ids").copy()

    @_mapped
    def update_values(self, bank: str, ids: Any, values: Any, *, ack: str | None = None,
                      caller: Caller | None = None) -> int:
        arrays = {"ids": _as_ids(ids), "values": _as_values(values)}
        requests = streams.write_stream(pb.UpdateValuesRequest, "bank", bank, arrays,
                                        ack=msg.ack_to_pb(ack))
        return self._stub.UpdateValues(requests, **self._opts(caller)).updated

    @_mapped
    def remove(self, bank: str, ids: Any, *, ack: str | None = None,
               caller: Caller | None = None) -> int:
        req = pb.RemoveRequest(bank=bank, ids=encode(_as_ids(ids), "ids"), ack=msg.ack_to_pb(ack))
        return self._stub.Remove(req, **self._opts(caller)).removed

    def search(self, banks: str | api.BankQuery | Sequence[str | api.BankQuery] | api.RowStacks,
               queries: Any, k: int, values: bool = True, keys: bool = False, *,
               caller: Caller | None = None) -> api.SearchResult:
        # The shared checks: a bad k or stack must not reach int32/double packing
        # (RowStacks checked its stacks when it was made).
        stack = banks if isinstance(banks, api.RowStacks) else api.bank_list(banks)
        req = search_wire.request(stack, api.check_k(k), values, keys)
        opts = self._opts(caller)
        rpcs = search_wire.Rpcs(stream=lambda r: self._search_stream(r, opts),
                                one=lambda r: self._search_unary(r, opts))
        return search_wire.call(rpcs, req, _as_float32(queries), self._buffers, self._route)

    @_mapped
    def _search_stream(self, req: pb.SearchRequest, opts: dict) -> Iterator[dict]:
        yield from self._search(req, **opts)

    @_mapped
    def _search_unary(self, req: pb.SearchRequest, opts: dict) -> dict:
        return self._search_one(req, **opts)

    @_mapped
    def _open_reply_buffer(self, size: int) -> pb.ReplyBuffer:
        return self._stub.OpenReplyBuffer(pb.OpenReplyBufferRequest(size_bytes=size),
                                          **self._opts())

    @_mapped
    def _close_reply_buffer(self, handle: str) -> None:
        self._stub.CloseReplyBuffer(pb.ReplyBufferRef(handle=handle), **self._opts())

    @property
    def reply_buffers(self) -> str:
        """How search replies travel: 'shared memory', or 'socket (<why>)'."""
        if self._buffers is None:
            return "socket (reply buffers not asked for)"
        return ("shared memory" if self._buffers.off_reason is None
                else f"socket ({self._buffers.off_reason})")

    @_mapped
    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False, *,
            caller: Caller | None = None) -> api.GetResult:
        req = pb.GetRequest(bank=bank, ids=encode(_as_ids(ids), "ids"), values=values,
                            keys=keys)
        return streams.read_get(self._stub.Get(req, **self._opts(caller)))

    @_mapped
    def export(self, bank: str, chunk_rows: int = api.CHUNK_ROWS, *,
               caller: Caller | None = None) -> Iterator[api.ExportChunk]:
        """Chunks of up to chunk_rows rows (the wire cuts them smaller; re-joined here).

        Like LocalMemory, a bad request (no such bank, ...) raises here, not
        at the first next(): the first reply is awaited before returning.
        """
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) \
                or chunk_rows <= 0:      # 0 would mean "server default" on the wire
            raise errors.InvalidArgument(f"chunk_rows must be positive; got {chunk_rows}")
        call = self._stub.Export(pb.ExportRequest(bank=bank, chunk_rows=chunk_rows),
                                 **self._opts(caller))
        first = next(call, None)
        return self._export_rest(itertools.chain([first] if first is not None else [], call),
                                 chunk_rows)

    @_mapped
    def _export_rest(self, messages, chunk_rows: int) -> Iterator[api.ExportChunk]:
        yield from streams.read_export(messages, chunk_rows)

    # -- session plane
    @_mapped
    def open_session(self, spec: api.SessionSpec, *,
                     caller: Caller | None = None) -> api.SessionInfo:
        req = pb.OpenSessionRequest(spec=msg.session_spec_to_pb(spec))
        return msg.session_from_pb(self._stub.OpenSession(req, **self._opts(caller)))

    @_mapped
    def append(self, session_id: str, keys: Any, values: Any = None, scores: Any = None, *,
               ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        arrays = {"keys": _as_float32(keys),
                  "values": None if values is None else _as_values(values),
                  "scores": None if scores is None else _as_float32(scores)}
        requests = streams.write_stream(pb.AppendRequest, "session_id", session_id, arrays,
                                        ack=msg.ack_to_pb(ack))
        reply = self._stub.Append(requests, **self._opts(caller))
        return decode(reply.ids, "ids").copy()

    @_mapped
    def session_info(self, session_id: str, *, caller: Caller | None = None) -> api.SessionInfo:
        req = pb.SessionRef(session_id=session_id)
        return msg.session_from_pb(self._stub.GetSession(req, **self._opts(caller)))

    @_mapped
    def list_sessions(self, tenant: str | None = None, *,
                      caller: Caller | None = None) -> list[api.SessionInfo]:
        req = pb.ListSessionsRequest(tenant=tenant or "")
        return [msg.session_from_pb(s)
                for s in self._stub.ListSessions(req, **self._opts(caller)).sessions]

    @_mapped
    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None, *,
                       caller: Caller | None = None) -> api.SessionInfo:
        req = pb.ExtendSessionRequest(
            session_id=session_id, ttl_idle_s=_opt_float(ttl_idle_s, "ttl_idle_s"),
            ttl_absolute_s=_opt_float(ttl_absolute_s, "ttl_absolute_s"))
        return msg.session_from_pb(self._stub.ExtendSession(req, **self._opts(caller)))

    @_mapped
    def close_session(self, session_id: str, *, caller: Caller | None = None) -> int:
        req = pb.SessionRef(session_id=session_id)
        return self._stub.CloseSession(req, **self._opts(caller)).released_bytes

    @_mapped
    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False, ack: str | None = None,
                        caller: Caller | None = None) -> api.PromoteResult:
        req = pb.PromoteSessionRequest(
            session_id=session_id, target=target,
            ids=None if ids is None else encode(_as_ids(ids), "ids"),
            min_score=_opt_float(min_score, "min_score"), dedup=_opt_float(dedup, "dedup"),
            move=bool(move), ack=msg.ack_to_pb(ack))
        return msg.promote_from_pb(self._stub.PromoteSession(req, **self._opts(caller)))

    # -- backup plane (paths on the daemon's host)
    @_mapped
    def snapshot_bank(self, name: str, path: str, *,
                      caller: Caller | None = None) -> api.SnapshotInfo:
        req = pb.SnapshotBankRequest(name=name, path=str(path))
        return msg.snapshot_from_pb(self._stub.SnapshotBank(req, **self._opts(caller)))

    @_mapped
    def restore_bank(self, path: str, name: str | None = None, *,
                     caller: Caller | None = None) -> api.BankInfo:
        req = pb.RestoreBankRequest(path=str(path), name=name or "")
        return msg.info_from_pb(self._stub.RestoreBank(req, **self._opts(caller)))

    @_mapped
    def backup(self, path: str, *, caller: Caller | None = None) -> api.SnapshotInfo:
        return msg.snapshot_from_pb(self._stub.Backup(pb.BackupRequest(path=str(path)),
                                                      **self._opts(caller)))

    # -- tenant plane
    @_mapped
    def set_tenant_quota(self, tenant: str, quota_bytes: int | None, *,
                         caller: Caller | None = None) -> api.TenantInfo:
        req = pb.SetTenantQuotaRequest(tenant=tenant, quota_bytes=msg.quota_to_pb(quota_bytes))
        return msg.tenant_from_pb(self._stub.SetTenantQuota(req, **self._opts(caller)))

    @_mapped
    def tenant_info(self, tenant: str, *, caller: Caller | None = None) -> api.TenantInfo:
        reply = self._stub.GetTenant(pb.TenantRef(name=tenant), **self._opts(caller))
        return msg.tenant_from_pb(reply)

    @_mapped
    def list_tenants(self, *, caller: Caller | None = None) -> list[api.TenantInfo]:
        reply = self._stub.ListTenants(pb.ListTenantsRequest(), **self._opts(caller))
        return [msg.tenant_from_pb(t) for t in reply.tenants]

    # -- token plane (admin tokens only)
    @_mapped
    def create_token(self, tenant: str | None = None, role: str = "write", name: str = "", *,
                     caller: Caller | None = None) -> api.CreatedToken:
        req = pb.CreateTokenRequest(tenant=tenant or "", role=role, name=name)
        return token_wire.created_from_pb(self._stub.CreateToken(req, **self._opts(caller)))

    @_mapped
    def list_tokens(self, tenant: str | None = None, *,
                    caller: Caller | None = None) -> list[api.TokenInfo]:
        reply = self._stub.ListTokens(pb.ListTokensRequest(tenant=tenant or ""),
                                      **self._opts(caller))
        return [token_wire.token_from_pb(t) for t in reply.tokens]

    @_mapped
    def revoke_token(self, token_id: str, *, caller: Caller | None = None) -> api.TokenInfo:
        reply = self._stub.RevokeToken(pb.RevokeTokenRequest(id=token_id), **self._opts(caller))
        return token_wire.token_from_pb(reply)
