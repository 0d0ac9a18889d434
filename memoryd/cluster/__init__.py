"""memoryd past one machine: N shard processes with one catalog, and the router.

    placement.py  where rows and sessions live: id mod N, session id mod N
    search.py     one search split over the shards, and their answers merged exactly
    fanout.py     calls on N shards in parallel, and the one failure rule
    reports.py    one view of what the shards report (banks, tenants)
    sharded.py    ShardedMemory: every plane of memoryd.api over shard backends

A shard is `memoryd serve --shard-index i --num-shards N --catalog-url URL`
(a LocalMemory with a Placement); the router is `memoryd route --shards
A,B,...` or, in the model's process, `MemoryClient.sharded([A, B, ...])`.
Nothing here knows a transport: shards are MemoryBackends.
"""
from memoryd.cluster.placement import Placement
from memoryd.cluster.sharded import ShardedMemory

__all__ = ["Placement", "ShardedMemory"]
