"""Facts about a bank's keys that both sides need, in pure numpy (no faiss).

The daemon's storage builds indexes from these; the model-side layer reads
them off a BankSpec to know, without loading the storage engine, whether a
bank's scores are exact q.k and how to rebuild product keys from ids.

Index specs: any faiss `index_factory` string, optionally followed by search
parameters after a '|' (faiss ParameterSpace syntax), e.g.
"HNSW32|efSearch=128" or "IVF1024,Flat|nprobe=32"; or "product-keys:<n>"
with an optional "|seed=<s>" for a product-key bank.

Product keys (Lample et al. 2019; DESIGN lesson 12): K = n^2 fixed unit keys

    key(i * n + j) = concat(c1[i], c2[j]) / sqrt(2)

from two tables of n seeded random unit sub-keys, one per half of the key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from memoryd.errors import InvalidArgument

PRODUCT_KEYS = "product-keys"
MAX_SUBKEYS = 1 << 16
_PRODUCT_SPEC = re.compile(r"^product-keys:(\d+)(?:\|seed=(\d+))?$")

# index_factory parts that keep the stored vectors as they are: such an index's
# scores are the exact distances of the keys it returns (approximate search
# only chooses WHICH keys). Quantisers (PQ, SQ, ...) and transforms (PCA, ...)
# change the distances themselves.
_EXACT_PART = re.compile(r"^(IDMap2?|IVF\d+(_HNSW\d+)?|HNSW\d+|Flat|FlatIP|FlatL2)$")


@dataclass(frozen=True)
class IndexSpec:
    factory: str         # the index_factory part
    params: str          # ParameterSpace string, may be empty

    @classmethod
    def parse(cls, text: str) -> "IndexSpec":
        factory, _, params = text.partition("|")
        factory = factory.strip()
        if not factory:
            raise InvalidArgument(f"empty faiss index spec in {text!r}")
        return cls(factory, params.strip())


def is_product_keys(index: str) -> bool:
    return index.strip().startswith(PRODUCT_KEYS)


def exact_scores(index: str) -> bool:
    """Whether the scores of a bank with this index spec are exact for the keys it returns."""
    if is_product_keys(index):
        return True
    factory = IndexSpec.parse(index).factory
    return all(_EXACT_PART.match(part.strip()) for part in factory.split(","))


def parse_product_keys(index: str) -> tuple[int, int]:
    """(n sub-keys per half, seed) of a product-keys spec."""
    m = _PRODUCT_SPEC.match(index.replace(" ", ""))
    if not m:
        raise InvalidArgument(
            f"bad product-keys spec {index!r}: use 'product-keys:<n>[|seed=<s>]', e.g. "
            "'product-keys:1024' for 1024^2 = 1,048,576 keys")
    n, seed = int(m.group(1)), int(m.group(2) or 0)
    if not 2 <= n <= MAX_SUBKEYS:
        raise InvalidArgument(f"product keys need 2..{MAX_SUBKEYS} sub-keys per half; got {n}")
    return n, seed


def subkeys(n: int, dim: int, seed: int) -> np.ndarray:
    """(2, n, dim/2) seeded random unit sub-keys: the whole key set."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((2, n, dim // 2), dtype=np.float32)
    return c / np.linalg.norm(c, axis=2, keepdims=True)


def subkeys_of(index: str, dim: int) -> np.ndarray:
    """The sub-key tables (2, n, dim/2) of a product-key bank's spec."""
    n, seed = parse_product_keys(index)
    return subkeys(n, dim, seed)


def key_vectors(sub: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(..., dim) keys of valid ids of the bank whose sub-key tables are sub (2, n, dim/2)."""
    n = sub.shape[1]
    return np.concatenate([sub[0][ids // n], sub[1][ids % n]], axis=-1) / np.float32(math.sqrt(2.0))
