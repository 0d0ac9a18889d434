"""The wire: both ends of every protocol of memoryd.v1, shared by the daemon
(memoryd.daemon) and the client (knnlayer.client). No engine, no storage.

    tensors.py      Tensor codec: raw little-endian bytes + dtype + shape
    messages.py     api value types <-> messages (specs, infos, sessions, stats)
    status.py       domain errors <-> gRPC statuses with ErrorInfo/QuotaFailure
    streams.py      stream pieces: chunking within 4 MiB, collecting, joining
    search.py       the Search RPC: stacks, queries, replies (stream or buffer)
    fastwire.py     hand-written protobuf encoding of tensor messages (hot path)
    shm.py          reply buffers: the shared-memory files, both sides
    reply_pool.py   the client's pool of reply buffers
    channel.py      addresses, message limits, call metadata, a fast probe
"""
