"""knnlayer: the model-side half: memory backends and the KNN attention layer."""
from memoryd.api import (BankInfo, BankQuery, BankSpec, GetResult, MemoryBackend, PromoteResult,
                         SearchResult, SessionInfo, SessionSpec, Stats, TenantInfo)


def __getattr__(name):  # lazy: importing the layer must not start gRPC or faiss
    if name == "LocalMemory":
        from memoryd.local import LocalMemory
        return LocalMemory
    if name in ("KNNAttention", "KNNAttentionConfig"):
        from knnlayer import attention
        return getattr(attention, name)
    if name == "MemoryClient":
        from knnlayer.client import MemoryClient
        return MemoryClient
    raise AttributeError(name)


__all__ = ["BankInfo", "BankQuery", "KNNAttention", "KNNAttentionConfig", "PromoteResult",
           "SessionInfo", "SessionSpec", "TenantInfo", "BankSpec", "GetResult", "LocalMemory", "MemoryBackend",
           "MemoryClient", "SearchResult", "Stats"]
