"""The Search RPC, both ends: the stack, the queries, the reply (streamed or
through a reply buffer).

Request: a stack of plain names travels as `banks`; a stack where some bank
has options as `stack` (BankQuery messages); per-row stacks (api.RowStacks)
as `row_stacks` (RowStack messages, each a stack and its row count). Queries
travel inline, or, when the call names a reply buffer the client may write,
at offset 0 of that buffer (Tensor.buffer_offset; the daemon copies them out
first).

Reply: when the call names a reply buffer and the arrays fit, ONE message
whose tensors carry buffer offsets (memoryd.wire.shm); otherwise messages of
consecutive query rows (`offset` = first row), each within the stream piece
limit (memoryd.wire.streams). Both are serialised by memoryd.wire.fastwire,
byte-identical to protobuf, with the payload copied once.

Two RPCs carry it: Search (server-streaming) and SearchOne (unary: the reply
as ONE message, placed or inline within one stream piece, else
ReplyTooLarge). gRPC Python's streaming path waits for each message to be
sent before it sends the status, 0.1-0.3 ms a call: a decode-sized
search takes SearchOne whenever the client can predict that its reply fits
(Route), and Search otherwise.

    daemon:  decode_request(request, buffers) -> SearchCall
             encode_reply(result, buf) -> Iterator[bytes]      (Search)
             encode_one(result, buf) -> bytes                  (SearchOne)
    client:  request(stack or row stacks, k, values, keys) -> pb.SearchRequest
             call(Rpcs(stream, one), request, queries, pool, route) -> SearchResult
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from memoryd import api, errors
from memoryd.errors import InvalidArgument
from memoryd.v1 import memory_pb2 as pb
from memoryd.wire import fastwire, shm, streams
from memoryd.wire.messages import (bank_query_from_pb, bank_query_to_pb, is_plain,
                                   row_stacks_from_pb, row_stacks_to_pb)
from memoryd.wire.reply_pool import ReplyBufferPool
from memoryd.wire.tensors import FROM_PB, check_shape, encode, required

METHOD = "/memoryd.v1.Memory/Search"
ONE_METHOD = "/memoryd.v1.Memory/SearchOne"
FIELDS = ("ids", "scores", "bank", "values", "keys")      # SearchResponse's tensors
RESULT_BYTES = 8 + 4 + 4     # one result's id (int64), score (float32) and bank (int32)


# ---- daemon side ----------------------------------------------------------------------

@dataclass
class SearchCall:
    """A decoded SearchRequest: what the backend's search takes, and where to reply."""

    stack: list[str | api.BankQuery] | api.RowStacks
    queries: np.ndarray
    k: int
    values: bool
    keys: bool
    buffer: shm.ReplyBufferFile | None


def decode_request(request: pb.SearchRequest, buffers: shm.ReplyBuffers,
                   owner: str | None = None) -> SearchCall:
    """owner: the caller's token (None: auth off); another's buffer is unknown."""
    buf = buffers.get(request.reply_buffer, owner) if request.reply_buffer else None
    return SearchCall(stack=_stack(request), queries=_queries(request, buf), k=request.k,
                      values=request.values, keys=request.keys, buffer=buf)


def _stack(request: pb.SearchRequest) -> list[str | api.BankQuery] | api.RowStacks:
    if request.row_stacks:
        if request.banks or request.stack:
            raise InvalidArgument("SearchRequest: row_stacks replaces banks and stack; "
                                  "send only one of them")
        return row_stacks_from_pb(request.row_stacks)
    if request.stack:
        if request.banks:
            raise InvalidArgument("SearchRequest: stack replaces banks (a bank with options "
                                  "per entry); send only one of them")
        return [bank_query_from_pb(q) for q in request.stack]
    return list(request.banks)


def _queries(request: pb.SearchRequest, buf: shm.ReplyBufferFile | None) -> np.ndarray:
    """From the message, or copied out of the reply buffer (before the reply
    is written over them)."""
    t = request.queries
    if not (request.HasField("queries") and t.HasField("buffer_offset")):
        return required(request, "queries", "queries")
    if buf is None:
        raise InvalidArgument("queries: a buffer offset, but no reply_buffer named")
    if t.dtype not in FROM_PB or len(t.data):
        raise InvalidArgument("queries: a buffer offset needs a dtype and no data")
    check_shape(tuple(t.shape), "queries")
    with buf.lock:
        return buf.read(shm.Placed(FROM_PB[t.dtype], tuple(t.shape), t.buffer_offset))


def encode_reply(r: api.SearchResult, buf: shm.ReplyBufferFile | None) -> Iterator[bytes]:
    """Search's serialised messages: one placed in buf when it fits, else a stream."""
    arrays = _arrays(r)
    placed = _placed(arrays, buf, r)
    if placed is not None:
        yield placed
        return
    for s in streams.chunk_slices(len(r.ids), streams.row_bytes(*arrays.values())):
        yield fastwire.encode(pb.SearchResponse, offset=s.start,
                              **{f: None if a is None else a[s] for f, a in arrays.items()},
                              missing_shards=_missing(r) if s.start == 0 else None)


def encode_one(r: api.SearchResult, buf: shm.ReplyBufferFile | None) -> bytes:
    """SearchOne's ONE serialised message: placed in buf when it fits, else
    inline within one stream piece (so a default 4 MiB receive limit reads
    it); ReplyTooLarge when neither (the client then calls Search)."""
    arrays = _arrays(r)
    placed = _placed(arrays, buf, r)
    if placed is not None:
        return placed
    size = sum(a.nbytes for a in arrays.values() if a is not None)
    if size > streams.CHUNK_BYTES:
        where = "the reply buffer nor " if buf is not None else ""
        raise errors.ReplyTooLarge(
            f"SearchOne: the reply's {size} bytes of arrays fit neither {where}one message "
            f"({streams.CHUNK_BYTES} bytes); make the same request as Search (streamed)")
    return fastwire.encode(pb.SearchResponse, offset=0, **arrays, missing_shards=_missing(r))


def _arrays(r: api.SearchResult) -> dict[str, np.ndarray | None]:
    return {f: getattr(r, f) for f in FIELDS}


def _missing(r: api.SearchResult) -> np.ndarray | None:
    """The shards a partial answer lacks, as the first message carries them (None: complete)."""
    return np.asarray(r.missing_shards, np.int32) if r.missing_shards else None


def _placed(arrays: dict[str, np.ndarray | None], buf: shm.ReplyBufferFile | None,
            r: api.SearchResult) -> bytes | None:
    """The one message of a reply written into buf; None without a buffer or
    when it is too small (then the reply goes inline, and the client grows it)."""
    if buf is None:
        return None
    with buf.lock:
        placed = buf.place(arrays)
    return None if placed is None else fastwire.encode(pb.SearchResponse, offset=0, **placed,
                                                       missing_shards=_missing(r))


# ---- client side ----------------------------------------------------------------------

def request(stack: list[api.BankQuery] | api.RowStacks, k: int, values: bool,
            keys: bool) -> pb.SearchRequest:
    """The request without its queries; plain stacks travel as `banks` (what
    older daemons understand), per-row stacks as `row_stacks`."""
    if isinstance(stack, api.RowStacks):
        req = pb.SearchRequest.FromString(_row_stacks_bytes(stack))
        req.k, req.values, req.keys = k, values, keys
        return req
    if is_plain(stack):
        return pb.SearchRequest(banks=[q.name for q in stack], k=k, values=values, keys=keys)
    return pb.SearchRequest(stack=[bank_query_to_pb(q) for q in stack], k=k, values=values,
                            keys=keys)


@functools.lru_cache(maxsize=16)
def _row_stacks_bytes(rs: api.RowStacks) -> bytes:
    """A request holding only rs, serialised: a decode loop sends the same row
    stacks every step, and building B RowStack messages costs ~5 us a row
    (parsing these bytes back, ~8 us for 64 rows)."""
    return pb.SearchRequest(row_stacks=row_stacks_to_pb(rs)).SerializeToString()


@dataclass(frozen=True)
class Rpcs:
    """One search's two calls, both raising memoryd.errors (they map gRPC errors):
    stream(request) yields fastwire-decoded SearchResponse messages (Search),
    one(request) returns one (SearchOne)."""

    stream: Callable[[pb.SearchRequest], Iterable[dict]]
    one: Callable[[pb.SearchRequest], dict]


class Route:
    """The client's choice between SearchOne and Search, and what it learned
    to make it (one per channel; threads may share it).

    SearchOne when the reply predictably fits one message: its arrays,
    nq * k * (RESULT_BYTES + value bytes + key bytes), within one stream
    piece, or within the reply buffer the call offers. Key bytes are 4 * dim
    (from the queries); value bytes per result are learned from the last
    reply to the same request (its serialised stack, k and flags: a few us
    even for 64 row stacks), so the first search of a stack with values goes
    by Search. A wrong guess (a bank remade with wider values) costs the
    search twice: ReplyTooLarge, then Search. A daemon without SearchOne
    (UNIMPLEMENTED) is not asked again.
    """

    MAX_REQUESTS = 4096        # requests remembered (sessions come and go): then forget all

    def __init__(self) -> None:
        self.unary = True
        self._value_bytes: dict[bytes, int] = {}     # request without queries -> bytes/result

    def expect(self, req: pb.SearchRequest, queries: np.ndarray) -> tuple[bytes, int | None]:
        """(req's key, its reply's array bytes; None when unknown or SearchOne is
        not to be used). req has no queries yet (see request())."""
        key = req.SerializeToString()
        if not self.unary or queries.ndim != 2:          # no (nq, dim): Search reports it
            return key, None
        value_bytes = self._value_bytes.get(key) if req.values else 0
        if value_bytes is None:
            return key, None
        nq, dim = queries.shape                          # queries: (nq, dim)
        return key, nq * req.k * (RESULT_BYTES + value_bytes + (4 * dim if req.keys else 0))

    @staticmethod
    def fits_one(need: int | None, buf: shm.MappedReplyBuffer | None) -> bool:
        return need is not None and (
            need <= streams.CHUNK_BYTES
            or (buf is not None and need + len(FIELDS) * shm.ALIGN <= buf.size))  # + alignment

    def learn(self, key: bytes, req: pb.SearchRequest, r: api.SearchResult) -> None:
        if not req.values:
            return
        if len(self._value_bytes) >= self.MAX_REQUESTS:
            self._value_bytes.clear()
        v = r.values                                     # (nq, k, value_dim) or None
        self._value_bytes[key] = 0 if v is None else v.itemsize * math.prod(v.shape[2:])


def call(rpcs: Rpcs, req: pb.SearchRequest, queries: np.ndarray,
         pool: ReplyBufferPool | None, route: Route) -> api.SearchResult:
    """Run one search through a buffer of the pool when one is free, else inline.

    A buffer the daemon no longer has is dropped and the search retried
    inline; a buffer whose call failed otherwise is dropped too (a cancelled
    call may still be writing into it).
    """
    key, need = route.expect(req, queries)
    buf = pool.take() if pool is not None else None
    try:
        result = _either(rpcs, req, queries, buf, route.fits_one(need, buf), route)
    except errors.UnknownReplyBuffer:        # the daemon closed it (idle, restarted)
        pool.drop(buf)
        buf = None
        result = _either(rpcs, req, queries, None, route.fits_one(need, None), route)
    except BaseException:
        if buf is not None:
            pool.drop(buf)
        raise
    route.learn(key, req, result)
    if pool is not None:
        pool.give(buf, shm.layout(_arrays(result))[1])
    return result


def _either(rpcs: Rpcs, req: pb.SearchRequest, queries: np.ndarray,
            buf: shm.MappedReplyBuffer | None, one: bool, route: Route) -> api.SearchResult:
    """SearchOne when `one` (the reply should fit one message), else Search;
    also after SearchOne said it did not fit, or does not exist. Neither
    refusal touched the buffer, so the retry keeps it."""
    if one and route.unary:
        try:
            return _once(lambda r: (rpcs.one(r),), req, queries, buf)
        except errors.ReplyTooLarge:
            pass
        except errors.MemorydError as e:
            if getattr(e, "code", None) != "UNIMPLEMENTED":
                raise
            route.unary = False              # a daemon older than SearchOne
    return _once(rpcs.stream, req, queries, buf)


def _once(rpc, req: pb.SearchRequest, queries: np.ndarray,
          buf: shm.MappedReplyBuffer | None) -> api.SearchResult:
    req.reply_buffer = buf.handle if buf is not None else ""
    if (buf is not None and buf.writable and queries.dtype == np.float32
            and queries.ndim == 2 and queries.nbytes <= buf.size):
        p = buf.write(queries)
        req.queries.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=p.shape, buffer_offset=p.offset))
    else:
        req.queries.CopyFrom(encode(queries, "queries"))
    blocks: dict[str, list] = {f: [] for f in FIELDS}
    missing: tuple[int, ...] = ()
    for msg in rpc(req):
        streams.check_offset(msg.get("offset", 0), blocks["ids"], "Search")
        if isinstance(msg.get("missing_shards"), np.ndarray):
            missing = tuple(int(q) for q in msg["missing_shards"])
        for f in blocks:
            if f in msg:
                blocks[f].append(msg[f])
    for f, parts in blocks.items():          # arrays in the buffer: copied out of it
        if any(isinstance(p, shm.Placed) for p in parts):
            if buf is None or len(parts) != 1:
                raise errors.MemorydError(f"Search reply puts '{f}' in a reply buffer "
                                          "this call did not offer")
            blocks[f] = [buf.read(parts[0])]
    opt = {f: streams.joined(blocks[f]) if blocks[f] else None for f in ("values", "keys")}
    return api.SearchResult(ids=streams.joined(blocks["ids"]),
                            scores=streams.joined(blocks["scores"]),
                            bank=streams.joined(blocks["bank"]), **opt,
                            missing_shards=missing)
