"""LocalMemory: the in-process backend (catalog + banks), no daemon needed.

This is the engine the daemon serves as well: `memoryd serve` wraps one
LocalMemory in thin gRPC handlers, so the two backends share every rule.

Layout of a data dir:
    catalog.db              SQLite catalog (unless --catalog-url says otherwise)
    banks/<name>-<hex>/     one folder per bank (memoryd.bank, memoryd.store)
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import memoryd
from memoryd import api
from memoryd import faiss_index as fx
from memoryd.api import BankInfo, BankSpec, ExportChunk, GetResult, SearchResult, Stats
from memoryd.arrays import id_vector, matrix, value_dtype
from memoryd.bank import Bank
from memoryd.product_keys import ProductKeyBank, is_product_keys
from memoryd.catalog import Catalog
from memoryd.errors import BankFrozen, InvalidArgument, NotFound
from memoryd.topk import merge_topk

log = logging.getLogger("memoryd")


class LocalMemory:
    """The memory backend in this process. Thread-safe."""

    def __init__(self, data_dir: str | Path, catalog_url: str | None = None, *,
                 search_threads: int = 4):
        self.data_dir = Path(data_dir).resolve()
        (self.data_dir / "banks").mkdir(parents=True, exist_ok=True)
        self.catalog_url = catalog_url or f"sqlite:///{self.data_dir / 'catalog.db'}"
        self.catalog = Catalog(self.catalog_url)
        self._banks: dict[str, Bank] = {}
        self._admin = threading.Lock()   # guards the _banks dict, not bank contents
        self._pool = ThreadPoolExecutor(search_threads, thread_name_prefix="memoryd-search")
        self._started = time.time()
        self._closed = False
        self._open_all()

    # ---- open / close ------------------------------------------------------------
    def _open_all(self) -> None:
        storages = self.catalog.storages()
        for info in self.catalog.list_banks():
            bank = new_bank(self._bank_path(storages[info.name]), info.spec).open()
            bank.frozen = info.frozen
            self._banks[info.name] = bank
            self.catalog.reconcile(info.name, bank.nbytes(), bank.count)
        known = set(storages.values())
        for folder in (self.data_dir / "banks").iterdir():
            if folder.name not in known:  # a create or delete torn by a crash
                log.warning("removing orphan bank folder %s", folder)
                _rmtree(folder)

    def close(self) -> None:
        """Snapshot every index and release files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for bank in list(self._banks.values()):
            with bank.lock.write():
                bank.checkpoint()
        self._pool.shutdown(wait=True)
        self.catalog.close()

    def __enter__(self) -> "LocalMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _bank_path(self, storage: str) -> Path:
        return self.data_dir / "banks" / storage

    def _bank(self, name: str) -> Bank:
        try:
            return self._banks[name]
        except KeyError:
            raise NotFound(f"no bank named '{name}'") from None

    # ---- bank admin --------------------------------------------------------------
    def create_bank(self, spec: BankSpec) -> BankInfo:
        spec.validated()
        with self._admin:
            storage = f"{spec.name}-{uuid.uuid4().hex[:12]}"
            bank = new_bank(self._bank_path(storage), spec)   # InvalidArgument on a bad spec
            self.catalog.create_bank(spec, storage)            # AlreadyExists
            try:
                bank.create()
                if bank.count:  # born full (product keys): its bytes must fit the quota
                    self.catalog.reserve(spec.name, bank.nbytes(), bank.count, op="create")
                else:  # an empty index's few header bytes are recorded, never refused
                    self.catalog.reconcile(spec.name, bank.nbytes(), 0)
            except BaseException:
                self.catalog.delete_bank(spec.name)
                _rmtree(bank.path)
                raise
            self._banks[spec.name] = bank
            self.catalog.update_bank(spec.name, trained=bank.trained)
        return self.bank_info(spec.name)

    def bank_info(self, name: str) -> BankInfo:
        return self.catalog.bank(name)

    def list_banks(self, tenant: str | None = None) -> list[BankInfo]:
        return self.catalog.list_banks(tenant)

    def delete_bank(self, name: str) -> int:
        with self._admin:
            bank = self._bank(name)
            with bank.lock.write():
                released = self.catalog.delete_bank(name)
                del self._banks[name]
                bank.delete_files()
        return released

    def freeze_bank(self, name: str) -> BankInfo:
        bank = self._bank(name)
        with bank.lock.write():
            if bank.frozen:
                return self.catalog.bank(name)
            bank.checkpoint()
            info = self.catalog.update_bank(name, frozen=True, checksum=bank.checksum())
            bank.frozen = True
            return info

    def set_quota(self, name: str, quota_bytes: int | None) -> BankInfo:
        if quota_bytes is not None and quota_bytes < 0:
            raise InvalidArgument(f"quota must not be negative; got {quota_bytes}")
        self._bank(name)
        return self.catalog.set_quota(name, quota_bytes)

    # ---- writes ------------------------------------------------------------------
    def _writable(self, name: str) -> Bank:
        bank = self._bank(name)
        if bank.frozen:  # mirrors the catalog: only this process writes it
            raise BankFrozen(f"bank '{name}' is frozen: it accepts no writes")
        return bank

    def _values_for(self, bank: Bank, values: Any, n: int) -> np.ndarray | None:
        spec = bank.spec
        if spec.value_dim == 0:
            if values is not None:
                raise InvalidArgument(f"bank '{spec.name}' holds keys only: do not send values")
            return None
        if values is None:
            raise InvalidArgument(
                f"bank '{spec.name}' holds values (value_dim {spec.value_dim}): send them with the keys")
        v = matrix(values, "values", spec.value_dim, value_dtype(spec.value_dtype))
        if len(v) != n:
            raise InvalidArgument(f"got {n} keys but {len(v)} values")
        return v

    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None) -> np.ndarray:
        b = self._bank(bank)
        k = matrix(keys, "keys", b.spec.dim, np.dtype(np.float32))
        v = self._values_for(b, values, len(k))
        given = None if ids is None else id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            new_ids = b.new_ids(len(k), given)
            was_trained = b.trained
            template = b.trained_template(k)
            before = b.nbytes()
            delta = b.nbytes(b.count + len(k), template) - before
            self.catalog.reserve(bank, delta, len(k))       # QuotaExceeded: nothing written
            try:
                b.add(new_ids, k, v, template)
            except BaseException:
                self.catalog.release(bank, delta, len(k), op="add-failed")
                raise
            if b.trained and not was_trained:
                self.catalog.update_bank(bank, trained=True)
        return new_ids

    def update_values(self, bank: str, ids: Any, values: Any) -> int:
        b = self._bank(bank)
        i = id_vector(ids)
        v = self._values_for(b, values, len(i))
        with b.lock.write():
            self._writable(bank)
            return b.update_values(i, v)

    def remove(self, bank: str, ids: Any) -> int:
        b = self._bank(bank)
        i = id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            before = b.nbytes()
            removed = b.remove(np.unique(i))
            if removed:
                self.catalog.release(bank, before - b.nbytes(), removed, op="remove")
            return removed

    # ---- reads -------------------------------------------------------------------
    def search(self, banks: str | Sequence[str], queries: Any, k: int,
               values: bool = True, keys: bool = False) -> SearchResult:
        names = api.bank_list(banks)
        k = api.check_k(k)
        chosen = [self._bank(n) for n in names]
        first = chosen[0].spec
        for b in chosen[1:]:
            if (b.spec.dim, b.spec.metric) != (first.dim, first.metric):
                raise InvalidArgument(
                    f"banks of one search must share dim and metric: '{first.name}' is "
                    f"{first.dim}-d {first.metric}, '{b.spec.name}' is {b.spec.dim}-d {b.spec.metric}")
        vdt = _common_values(chosen) if values else None
        values = vdt is not None
        q = matrix(queries, "queries", first.dim, np.dtype(np.float32))
        with ExitStack() as stack:
            for b in sorted(chosen, key=lambda b: b.spec.name):
                stack.enter_context(b.lock.read())
            return self._search_locked(chosen, q, k, first.metric, values, keys, vdt)

    def _search_locked(self, chosen: list[Bank], q: np.ndarray, k: int, metric: str,
                       values: bool, keys: bool, vdt) -> SearchResult:
        jobs = [(bi, si) for bi, b in enumerate(chosen) for si in range(b.spec.shards)]
        if len(jobs) == 1:
            parts = [chosen[0].search_shard(0, q, k)]
        else:
            parts = list(self._pool.map(lambda j: chosen[j[0]].search_shard(j[1], q, k), jobs))
        dist, ids, src = merge_topk(parts, [bi for bi, _ in jobs], k, metric)
        if len(chosen) == 1:  # gather straight into the result, no scatter
            _, out_k, out_v = chosen[0].gather(ids, keys=keys, values=values, out_values_dtype=vdt)
            return SearchResult(ids=ids, scores=dist, bank=src, values=out_v, keys=out_k)
        nq = len(q)
        value_dim = max(b.spec.value_dim for b in chosen)
        out_v = np.zeros((nq, k, value_dim), vdt) if values else None
        out_k = np.zeros((nq, k, chosen[0].spec.dim), np.float32) if keys else None
        for bi, b in enumerate(chosen):
            sel = src == bi
            if not sel.any():
                continue
            _, kk, vv = b.gather(ids[sel], keys=keys, values=values and b.spec.value_dim > 0,
                                 out_values_dtype=vdt)
            if keys:
                out_k[sel] = kk
            if vv is not None:
                out_v[sel] = vv
        return SearchResult(ids=ids, scores=dist, bank=src, values=out_v, keys=out_k)

    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False) -> GetResult:
        b = self._bank(bank)
        i = id_vector(ids)
        with b.lock.read():  # a key-only bank has no values to give: None
            found, kk, vv = b.gather(i, keys=keys, values=values and b.spec.value_dim > 0)
        return GetResult(found=found, values=vv, keys=kk)

    def export(self, bank: str, chunk_rows: int = 65536) -> Iterator[ExportChunk]:
        b = self._bank(bank)
        if chunk_rows <= 0:
            raise InvalidArgument(f"chunk_rows must be positive; got {chunk_rows}")
        return self._export(b, chunk_rows)

    @staticmethod
    def _export(b: Bank, chunk_rows: int) -> Iterator[ExportChunk]:
        # One snapshot under the read lock, handed out in chunks: a slow
        # reader never holds the bank's lock between chunks.
        with b.lock.read():
            chunks = list(b.export_chunks(chunk_rows))
        yield from chunks

    def stats(self) -> Stats:
        banks = self.list_banks()
        return Stats(version=memoryd.__version__, data_dir=str(self.data_dir),
                     catalog_url=_redact(self.catalog_url), uptime_s=time.time() - self._started,
                     banks=banks, used_bytes=sum(b.used_bytes for b in banks),
                     num_gpus=fx.num_gpus())


def new_bank(path: Path, spec: BankSpec) -> "Bank | ProductKeyBank":
    """The bank class a spec asks for (InvalidArgument if it cannot be built)."""
    return ProductKeyBank(path, spec) if is_product_keys(spec.index) else Bank(path, spec)


def _common_values(chosen: list[Bank]) -> np.dtype | None:
    """Value dtype of a merged result: the banks' own if shared, else float32.

    None when no bank holds values. Results from a key-only bank searched
    together with value banks get zero values (the layer pairs such a bank
    with a trainable value table of its own).
    """
    with_values = [b for b in chosen if b.spec.value_dim]
    if not with_values:
        return None
    dims = {b.spec.value_dim for b in with_values}
    if len(dims) > 1:
        raise InvalidArgument(f"banks of one search with values must share value_dim; got {sorted(dims)}")
    dtypes = {b.spec.value_dtype for b in with_values}
    return value_dtype(dtypes.pop()) if len(dtypes) == 1 else np.dtype(np.float32)


def _redact(url: str) -> str:
    """Hide a password in a catalog URL before it leaves the process."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
