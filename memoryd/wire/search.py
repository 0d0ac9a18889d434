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

    daemon:  decode_request(request, buffers) -> SearchCall
             encode_reply(result, buf) -> Iterator[bytes]
    client:  request(stack or row stacks, k, values, keys) -> pb.SearchRequest
             call(rpc, request, queries, pool) -> SearchResult
"""
from __future__ import annotations

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
FIELDS = ("ids", "scores", "bank", "values", "keys")      # SearchResponse's tensors


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


def decode_request(request: pb.SearchRequest, buffers: shm.ReplyBuffers) -> SearchCall:
    buf = buffers.get(request.reply_buffer) if request.reply_buffer else None
    return SearchCall(stack=_stack(request), queries=_queries(request, buf), k=request.k,
                      values=request.values, keys=request.keys, buffer=buf)


def _stack(request: pb.SearchRequest) -> list[str | api.BankQuery] | api.RowStacks:
    if request.row_stacks:
        if request.banks or request.stack:
            raise InvalidArgument("SearchRequest: row_stacks replaces banks and stack; "
                                  "send only one of them")
        return row_stacks_from_pb(request.row_stacks)
    if request.stack:
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
    """The reply's serialised messages: one placed in buf when it fits, else a stream."""
    arrays = {f: getattr(r, f) for f in FIELDS}
    if buf is not None:
        with buf.lock:
            placed = buf.place(arrays)
        if placed is not None:       # else too small: inline, and the client grows it
            yield fastwire.encode(pb.SearchResponse, offset=0, **placed)
            return
    for s in streams.chunk_slices(len(r.ids), streams.row_bytes(*arrays.values())):
        yield fastwire.encode(pb.SearchResponse, offset=s.start,
                              **{f: None if a is None else a[s] for f, a in arrays.items()})


# ---- client side ----------------------------------------------------------------------

def request(stack: list[api.BankQuery] | api.RowStacks, k: int, values: bool,
            keys: bool) -> pb.SearchRequest:
    """The request without its queries; plain stacks travel as `banks` (what
    older daemons understand), per-row stacks as `row_stacks`."""
    if isinstance(stack, api.RowStacks):
        return pb.SearchRequest(row_stacks=row_stacks_to_pb(stack), k=k, values=values,
                                keys=keys)
    if is_plain(stack):
        return pb.SearchRequest(banks=[q.name for q in stack], k=k, values=values, keys=keys)
    return pb.SearchRequest(stack=[bank_query_to_pb(q) for q in stack], k=k, values=values,
                            keys=keys)


def call(rpc: Callable[[pb.SearchRequest], Iterable[dict]], req: pb.SearchRequest,
         queries: np.ndarray, pool: ReplyBufferPool | None) -> api.SearchResult:
    """Run one search through a buffer of the pool when one is free, else inline.

    rpc(request) yields fastwire-decoded SearchResponse messages and raises
    memoryd.errors (it maps gRPC errors). A buffer the daemon no longer has
    is dropped and the search retried inline; a buffer whose call failed
    otherwise is dropped too (a cancelled call may still be writing into it).
    """
    buf = pool.take() if pool is not None else None
    try:
        result = _once(rpc, req, queries, buf)
    except errors.UnknownReplyBuffer:        # the daemon closed it (idle, restarted)
        pool.drop(buf)
        buf = None
        result = _once(rpc, req, queries, None)
    except BaseException:
        if buf is not None:
            pool.drop(buf)
        raise
    if pool is not None:
        pool.give(buf, shm.layout({f: getattr(result, f) for f in FIELDS})[1])
    return result


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
    for msg in rpc(req):
        streams.check_offset(msg.get("offset", 0), blocks["ids"], "Search")
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
                            bank=streams.joined(blocks["bank"]), **opt)
