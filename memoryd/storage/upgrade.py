"""Opening a bank written before the write-ahead log (format 1).

Format 1 kept a `state.json` per shard ({"generation", "rows",
"index_rows"}, index snapshot `index.<generation>.faiss`), `bank.json`
with `next_id` only, and `intent.json` while an add spanned shards (a
crash left it behind: the shards are rolled back to the row counts it
recorded). The bank opens from those as if they were a checkpoint record
and writes a format-2 checkpoint at once; the old files then go.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memoryd.api import BankSpec

INTENT = "intent.json"
STATE = "state.json"
SCORES = "scores.bin"    # format 1 sessions: (id int64, score float32) records
_SCORE_REC = np.dtype([("id", "<i8"), ("score", "<f4")])


def v1_meta(path: Path, meta: dict, spec: BankSpec) -> dict:
    """The checkpoint record a format-1 bank's files amount to."""
    before = None
    if (path / INTENT).exists():      # an add torn across shards: back to the counts before it
        before = json.loads((path / INTENT).read_text())["rows"]
    shards = []
    for i in range(spec.shards):
        state = json.loads((path / f"shard-{i:03d}" / STATE).read_text())
        gen, rows = int(state["generation"]), int(state["rows"])
        if before is not None:
            rows = min(rows, int(before[i]))
        index_rows = int(state.get("index_rows", 0))
        index = f"index.{gen}.faiss"
        if index_rows > rows or not (path / f"shard-{i:03d}" / index).exists():
            index, index_rows = None, 0
        shards.append({"gen": gen, "rows": rows, "index": index, "index_rows": index_rows})
        if spec.kind == "session":
            _v1_scores(path, path / f"shard-{i:03d}", gen, rows)
    return {"format": 1, "seq": 0, "lsn": 0, "next_id": int(meta.get("next_id", 0)),
            "spec": meta.get("spec"), "shards": shards}


def _v1_scores(bank: Path, shard: Path, gen: int, rows: int) -> None:
    """A session's scores moved from (id, score) records beside the bank into
    the shard's score column (NaN for rows appended without one)."""
    ids = np.fromfile(shard / f"ids.{gen}.bin", np.int64, count=rows)
    scores = np.full(rows, np.nan, np.float32)
    if (bank / SCORES).exists():
        recs = np.fromfile(bank / SCORES, _SCORE_REC)
        by_id = dict(zip(recs["id"].tolist(), recs["score"].tolist()))
        scores[:] = [by_id.get(i, np.nan) for i in ids.tolist()]
    scores.tofile(shard / f"scores.{gen}.bin")


def drop_v1_files(path: Path) -> None:
    """Once a format-2 checkpoint exists: the format-1 bookkeeping goes."""
    (path / INTENT).unlink(missing_ok=True)
    (path / SCORES).unlink(missing_ok=True)
    for state in path.glob(f"shard-*/{STATE}"):
        state.unlink()
