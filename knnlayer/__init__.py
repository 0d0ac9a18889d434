"""knnlayer: the model-side half: the KNN attention layer and the gRPC memory client.

Nothing here imports the daemon's engine or storage (nor faiss): the layer
depends on the memory interface (memoryd.api), the in-process backend lives
in memoryd.engine (`from memoryd.engine import LocalMemory`).
"""
from memoryd.api import (BankInfo, BankQuery, BankSpec, GetResult, MemoryBackend, PromoteResult,
                         RowStacks, SearchResult, SessionInfo, SessionSpec, Stats, TenantInfo)

DOMAIN_TOOLS = ("create_domain_bank", "data_keys", "fit_values", "key_version", "random_keys",
                "readout_values", "stale_banks")


def __getattr__(name):  # lazy: importing the package must not start gRPC or torch
    if name in ("KNNAttention", "KNNAttentionConfig"):
        from knnlayer import attention
        return getattr(attention, name)
    if name in ("MemorizingAttention", "MemorizingConfig"):
        from knnlayer import memorizing
        return getattr(memorizing, name)
    if name == "MemoryClient":
        from knnlayer.client import MemoryClient
        return MemoryClient
    if name == "ClientTLS":                  # MemoryClient(addr, tls=ClientTLS(ca=...))
        from memoryd.wire.tls import ClientTLS
        return ClientTLS
    if name == "create_base_bank":
        from knnlayer.bank_tools import create_base_bank
        return create_base_bank
    if name in DOMAIN_TOOLS:
        from knnlayer import domain
        return getattr(domain, name)
    raise AttributeError(name)


__all__ = ["BankInfo", "BankQuery", "BankSpec", "ClientTLS", "GetResult", "KNNAttention", "KNNAttentionConfig",
           "MemorizingAttention", "MemorizingConfig", "MemoryBackend", "MemoryClient",
           "PromoteResult", "RowStacks", "SearchResult", "SessionInfo", "SessionSpec", "Stats",
           "TenantInfo", "create_base_bank", *DOMAIN_TOOLS]
