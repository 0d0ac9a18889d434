"""Streams: how big payloads are cut into messages and put back together, both ends.

Every streamed message carries about CHUNK_BYTES of array bytes (at least
one row) plus its framing (tags, lengths, shapes: well under FRAMING_BYTES),
so each fits gRPC's default 4 MiB receive limit (DEFAULT_RECEIVE_LIMIT): a
client on default channel options reads every stream as long as one row
fits. (Python gRPC also moves ~1 GB/s in 1-16 MB messages and much less in
one 64 MB message.)

Client-streaming writes (Add, Append, UpdateValues): the first message names
the bank (or session); later ones may leave the name empty or repeat it.
Each message carries the same fields: a field present in one message is
present in all, and the rows of all messages are applied together, when the
stream ends, all or none.

Server-streaming replies (Search, Get, Export): consecutive rows; Search and
Get messages say at which row they start (`offset`).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import numpy as np

from memoryd import api
from memoryd.errors import InvalidArgument, MemorydError
from memoryd.wire.tensors import decode, encode, required

# One client-streamed write is held whole before it is applied (all or none):
# its total is bounded so a client cannot make the daemon hold any amount.
MAX_STREAM_BYTES = 4 << 30

DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024     # gRPC's default max_receive_message_length
FRAMING_BYTES = 4096                        # room left for a message's own framing
CHUNK_BYTES = DEFAULT_RECEIVE_LIMIT - FRAMING_BYTES


def row_bytes(*arrays: np.ndarray | None) -> int:
    """Bytes of one leading-axis row over several arrays."""
    return sum(a[:1].nbytes if len(a) else 0 for a in arrays if a is not None)


def rows_per_chunk(row_bytes: int, total_rows: int) -> int:
    """Rows per message so that a message carries at most CHUNK_BYTES (at least one row)."""
    return max(1, min(total_rows, CHUNK_BYTES // max(1, row_bytes)))


def chunk_slices(n: int, row_bytes: int) -> Iterator[slice]:
    """Row slices of the messages for n rows (one empty slice when n is 0)."""
    step = rows_per_chunk(row_bytes, n)
    for start in range(0, max(n, 1), step):
        yield slice(start, min(n, start + step))


# ---- client-streaming writes ------------------------------------------------------

def row_chunks(arrays: dict[str, np.ndarray | None]) -> Iterator[dict[str, np.ndarray]]:
    """The client's pieces of a write: aligned row blocks of about CHUNK_BYTES.

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
    for s in chunk_slices(n, row):
        yield {k: a[s] for k, a in present.items()}


def write_stream(message_type, target: str, name: str,
                 arrays: dict[str, np.ndarray | None], **header: Any) -> Iterator:
    """The client's messages of a write stream: the first names the target
    (field `target`: "bank" or "session_id"), each carries a row block.

    The first message is built here, at once: gRPC swallows an exception
    raised while it iterates a request stream (the call fails as UNKNOWN), so
    a bad dtype must raise in the caller. Later blocks share its dtypes.
    """
    messages = (message_type(**({target: name, **header} if i == 0 else {}),
                             **{field: encode(a, field) for field, a in block.items()})
                for i, block in enumerate(row_chunks(arrays)))
    first = next(messages)
    return itertools.chain([first], messages)


def collect(requests: Iterable, rpc: str, required_fields: tuple[str, ...],
            optional: tuple[str, ...], target: str = "bank"
            ) -> tuple[str, dict[str, np.ndarray | None], Any]:
    """The daemon's reading of a write stream: (bank, {field: all rows or
    None}, the first message: its header fields, e.g. `ack`).

    `target` is the field that names what the stream writes to ("bank", or
    "session_id" for Append).
    """
    bank = head = None
    noun = target.removesuffix("_id")
    parts: dict[str, list[np.ndarray]] = {f: [] for f in required_fields + optional}
    n = total = 0
    for n, msg in enumerate(requests, 1):
        total += msg.ByteSize()
        if total > MAX_STREAM_BYTES:   # before it is all held in memory, before any quota
            raise InvalidArgument(
                f"{rpc}: the stream passed {MAX_STREAM_BYTES >> 30} GiB; one write is at most "
                "that: send the rows in several calls")
        name = getattr(msg, target)
        if bank is None:
            if not name:
                raise InvalidArgument(f"{rpc}: the first message must name the {noun}")
            bank, head = name, msg
        elif name and name != bank:
            raise InvalidArgument(
                f"{rpc}: message {n - 1} names {noun} '{name}' but the stream "
                f"is for {noun} '{bank}'")
        for f in required_fields:
            parts[f].append(required(msg, f, f"{f} (message {n - 1})"))
        for f in optional:
            if msg.HasField(f):
                parts[f].append(decode(getattr(msg, f), f"{f} (message {n - 1})"))
    if bank is None:
        raise InvalidArgument(f"{rpc}: empty request stream; send at least one message")
    out: dict[str, np.ndarray | None] = {}
    for f, chunks in parts.items():
        if chunks and len(chunks) != n:
            raise InvalidArgument(
                f"{rpc}: {f} present in {len(chunks)} of {n} messages; "
                "send it in every message or in none")
        out[f] = _concat(chunks, f) if chunks else None
    return bank, out, head


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


# ---- server-streaming replies -----------------------------------------------------

def joined(blocks: list[np.ndarray]) -> np.ndarray:
    """The client's join of a reply's blocks: always a fresh, writable array
    (decoded blocks are read-only views of the message; copied here)."""
    if len(blocks) == 1:
        return blocks[0] if blocks[0].flags.writeable else blocks[0].copy()
    return np.concatenate(blocks)


def read_get(messages: Iterable) -> api.GetResult:
    """The client's GetResult from Get's reply stream."""
    blocks: dict[str, list[np.ndarray]] = {"found": [], "values": [], "keys": []}
    for msg in messages:
        check_offset(msg.offset, blocks["found"], "Get")
        for f in blocks:
            if msg.HasField(f):
                blocks[f].append(decode(getattr(msg, f), f))
    opt = {f: joined(blocks[f]) if blocks[f] else None for f in ("values", "keys")}
    return api.GetResult(found=joined(blocks["found"]).astype(bool), **opt)


def read_export(messages: Iterable, chunk_rows: int) -> Iterator[api.ExportChunk]:
    """The client's chunks of exactly chunk_rows rows (the last may be short)
    from Export's reply stream, which is cut by bytes and carries no chunk
    boundaries."""
    pending: list[api.ExportChunk] = []
    rows = 0
    for msg in messages:
        pending.append(api.ExportChunk(
            ids=joined([decode(msg.ids, "ids")]), keys=joined([decode(msg.keys, "keys")]),
            values=joined([decode(msg.values, "values")]) if msg.HasField("values") else None))
        rows += len(pending[-1].ids)
        while rows >= chunk_rows:
            whole = _join(pending)
            yield _rows(whole, slice(0, chunk_rows))
            pending = [_rows(whole, slice(chunk_rows, None))]
            rows -= chunk_rows
    if rows:
        yield _join(pending)


def _rows(c: api.ExportChunk, s: slice) -> api.ExportChunk:
    return api.ExportChunk(ids=c.ids[s], keys=c.keys[s],
                           values=None if c.values is None else c.values[s])


def _join(chunks: list[api.ExportChunk]) -> api.ExportChunk:
    if len(chunks) == 1:
        return chunks[0]
    return api.ExportChunk(
        ids=np.concatenate([c.ids for c in chunks]), keys=np.concatenate([c.keys for c in chunks]),
        values=None if chunks[0].values is None else np.concatenate([c.values for c in chunks]))


def check_offset(offset: int, blocks: list, rpc: str) -> None:
    """The client's check that a reply block starts where the previous ended."""
    expected = sum(len(b) for b in blocks)
    if offset != expected:
        raise MemorydError(
            f"{rpc} reply out of order: block at row {offset}, expected row {expected}")
