"""Array coercion and validation shared by every backend and the wire codec.

Callers may hand numpy arrays, torch tensors (any device, any float dtype) or
nested lists. Everything is turned into C-contiguous numpy arrays here, and
checked here, so that the in-process backend and the daemon reject the same
inputs with the same messages.
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from memoryd.errors import InvalidArgument

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
VALUE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16,
}


def value_dtype(name: str) -> np.dtype:
    try:
        return VALUE_DTYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"value dtype must be one of {', '.join(VALUE_DTYPES)}; got {name!r}") from None


def to_numpy(x: Any) -> np.ndarray:
    """numpy view/copy of x; torch tensors leave their device, bf16 included."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:   # ragged lists, ints past int64, ...
        raise InvalidArgument(f"not an array: {type(x).__name__} ({e})") from None


def _check_finite(a: np.ndarray, what: str) -> None:
    probe = a if a.dtype != BFLOAT16 else a.astype(np.float32)
    if not np.isfinite(probe).all():
        bad = int((~np.isfinite(probe)).sum())
        raise InvalidArgument(f"{what} contain {bad} NaN or Inf entries")


def matrix(x: Any, what: str, cols: int, dtype: np.dtype, *, allow_empty=False) -> np.ndarray:
    """A finite (n, cols) C-contiguous array of dtype, or InvalidArgument."""
    a = to_numpy(x)
    if a.dtype.kind not in "fiu" and a.dtype != BFLOAT16:
        raise InvalidArgument(f"{what} must be numeric; got dtype {a.dtype}")
    if a.ndim != 2:
        raise InvalidArgument(f"{what} must be a 2-d array (n, {cols}); got shape {a.shape}")
    if a.shape[1] != cols:
        raise InvalidArgument(f"{what} have dimension {a.shape[1]}; expected {cols}")
    if a.shape[0] == 0 and not allow_empty:
        raise InvalidArgument(f"{what} are empty: send at least one row")
    _check_finite(a, what)
    if a.dtype != dtype:
        with np.errstate(over="ignore"):
            a = a.astype(dtype)
        _check_finite(a, f"{what} (after conversion to {dtype.name})")
    return np.ascontiguousarray(a)


def id_vector(x: Any, what: str = "ids", *, allow_empty=False) -> np.ndarray:
    a = to_numpy(x)
    if a.ndim != 1:
        a = a.reshape(-1) if a.ndim == 0 else a
    if a.ndim != 1:
        raise InvalidArgument(f"{what} must be a 1-d array; got shape {a.shape}")
    if a.size == 0 and not allow_empty:
        raise InvalidArgument(f"{what} are empty: send at least one id")
    if a.size and a.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be integers; got dtype {a.dtype}")
    if a.size and a.dtype == np.uint64 and a.max() > np.iinfo(np.int64).max:
        raise InvalidArgument(f"{what} must fit in int64; got {int(a.max())}")
    return np.ascontiguousarray(a, dtype=np.int64)
