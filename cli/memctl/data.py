"""memctl import / export / search: moving rows in and out, and looking them up."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click
import numpy as np

from memoryd import errors
from memoryd.api import CHUNK_ROWS, BankQuery
from memoryd.arrays import BFLOAT16, VALUE_DTYPES
from memctl import output
from memctl.common import (BankValueType, json_option, load_npy, one_line, progress_bar,
                           progress_options, with_backend)


def _open_ids_out(path: str, n: int, start: int):
    """A writable (n,) int64 memmap for ids; kept across a resume."""
    fmt = np.lib.format
    if start > 0 and os.path.exists(path):
        ids = fmt.open_memmap(path, mode="r+")
        if ids.shape != (n,) or ids.dtype != np.int64:
            raise click.ClickException(
                f"{path} holds {ids.dtype}{list(ids.shape)}, not the int64[{n}] ids of this "
                "import: pass another --ids-out")
        return ids
    ids = fmt.open_memmap(path, mode="w+", dtype=np.int64, shape=(n,))
    ids[:] = -1
    return ids


@click.command("import")
@click.argument("bank_name", metavar="BANK")
@click.argument("keys_path", metavar="KEYS.npy", type=click.Path(dir_okay=False))
@click.argument("values_path", metavar="[VALUES.npy]", required=False,
                type=click.Path(dir_okay=False))
@click.option("--batch-size", type=click.IntRange(1), default=CHUNK_ROWS, show_default=True,
              help="rows per add call; each batch is stored atomically")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, metavar="ROW",
              help="skip rows before ROW (resume after an interruption)")
@click.option("--ids", "ids_path", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="store row i under the int64 id IDS[i] (e.g. the ids.npy of an export) "
                   "instead of letting the bank assign ids")
@click.option("--ids-out", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="write the assigned ids here (int64, one per row, -1 = not imported); "
                   "kept and filled in further when resuming with --start")
@progress_options
@with_backend
def import_(backend, bank_name, keys_path, values_path, batch_size, start, ids_path,
            ids_out, progress, quiet):
    """Add the rows of KEYS.npy (and VALUES.npy) to BANK.

    Shapes are checked against the bank before anything is sent. Rows go in
    batches, each stored atomically: if the import stops, whole batches are
    in and the error says which --start resumes it.

    \b
    Example:
        memctl import wiki keys.npy values.npy --ids-out ids.npy
        memctl import wiki keys.npy values.npy --ids-out ids.npy --start 131072
        memctl import wiki-copy backup/keys.npy backup/values.npy --ids backup/ids.npy
    """
    info = backend.bank_info(bank_name)
    spec = info.spec
    keys = load_npy(keys_path, "keys")
    values = load_npy(values_path, "values") if values_path else None
    if keys.ndim != 2:
        raise click.ClickException(f"{keys_path} has shape {keys.shape}: keys must be 2-d "
                                   f"(rows, {spec.dim})")
    n = keys.shape[0]
    if keys.shape[1] != spec.dim:
        raise click.ClickException(f"{keys_path} has key dim {keys.shape[1]} but bank "
                                   f"'{bank_name}' has dim {spec.dim}")
    if spec.value_dim and values is None:
        raise click.ClickException(f"bank '{bank_name}' stores values of dim {spec.value_dim}: "
                                   "pass VALUES.npy after KEYS.npy")
    if values is not None:
        if not spec.value_dim:
            raise click.ClickException(f"bank '{bank_name}' holds keys only (value dim 0): "
                                       f"do not pass {values_path}")
        if values.ndim != 2 or values.shape[1] != spec.value_dim:
            raise click.ClickException(
                f"{values_path} has shape {values.shape} but bank '{bank_name}' has value dim "
                f"{spec.value_dim}")
        if values.shape[0] != n:
            raise click.ClickException(f"{keys_path} has {n} rows but {values_path} has "
                                       f"{values.shape[0]}")
    given_ids = load_npy(ids_path, "ids") if ids_path else None
    if given_ids is not None and (given_ids.shape != (n,) or given_ids.dtype.kind not in "iu"):
        raise click.ClickException(f"{ids_path} holds {given_ids.dtype}{list(given_ids.shape)}: "
                                   f"--ids needs {n} integer ids, one per row of {keys_path}")
    if start > n:
        raise click.ClickException(f"--start {start} is past the last row ({n} rows)")
    if info.frozen:
        raise click.ClickException(f"bank '{bank_name}' is frozen (read-only)")
    if start == n:
        click.echo(f"nothing to import: --start {start} is the end of {keys_path}")
        return

    ids_map = _open_ids_out(ids_out, n, start) if ids_out else None
    count0 = info.count
    lo = hi = None
    row = start
    bar = progress_bar(n, start, f"import {bank_name}", False if quiet else progress)
    try:
        with bar:
            for row in range(start, n, batch_size):
                end = min(n, row + batch_size)
                kb = np.ascontiguousarray(keys[row:end])
                vb = np.ascontiguousarray(values[row:end]) if values is not None else None
                ib = (np.ascontiguousarray(given_ids[row:end], dtype=np.int64)
                      if given_ids is not None else None)
                ids = np.asarray(backend.add(bank_name, kb, vb, ib))
                if ids_map is not None:
                    ids_map[row:end] = ids
                if ids.size:
                    lo = int(ids.min()) if lo is None else min(lo, int(ids.min()))
                    hi = int(ids.max()) if hi is None else max(hi, int(ids.max()))
                bar.update(end - row)
            row = n
    except (Exception, KeyboardInterrupt) as e:
        if ids_map is not None:
            ids_map.flush()
        raise click.ClickException(_resume_message(backend, bank_name, e, start, row, n,
                                                   count0 + (row - start), batch_size)) from e
    finally:
        if ids_map is not None:
            ids_map.flush()
            del ids_map
    done = n - start
    click.echo(f"imported {output.count(done)} rows into '{bank_name}' (rows {start}..{n - 1}, "
               f"ids {lo}..{hi})" + (f"; ids written to {ids_out}" if ids_out else ""))


def _resume_message(backend, bank, exc, start, row, n, expected_count, batch_size) -> str:
    """The error, and the --start that resumes the import."""
    if isinstance(exc, KeyboardInterrupt):
        msg = "interrupted"
    elif isinstance(exc, click.ClickException):
        msg = exc.message
    elif isinstance(exc, (errors.MemorydError, ValueError, OSError)):
        msg = one_line(str(exc) or type(exc).__name__)
    else:
        msg = one_line(f"{type(exc).__name__}: {exc}")
    resume = row
    try:  # did the failed batch land anyway (e.g. the reply was lost)?
        now = backend.bank_info(bank).count
        if now == expected_count + min(batch_size, n - row) and now != expected_count:
            resume = min(n, row + batch_size)
            msg += " (the failed batch was stored; its ids are not in --ids-out)"
    except Exception:  # noqa: BLE001 - best effort only
        pass
    if resume == start:
        return msg + " - nothing was imported" + (f"; resume with --start {start}" if start
                                                   else "")
    return (f"{msg} - rows {start}..{resume - 1} were imported into '{bank}'; "
            f"resume with --start {resume}")


def export_bank(backend, bank_name: str, outdir: str, *, chunk_rows: int = CHUNK_ROWS,
                force: bool = False, progress: bool | None = None, what: str = "") -> str:
    """Write a bank (or a session's bank) to OUTDIR/{ids,keys,values}.npy; the summary line."""
    info = backend.bank_info(bank_name)
    spec = info.spec
    out = Path(outdir)
    names = ["ids.npy", "keys.npy"] + (["values.npy"] if spec.value_dim else [])
    existing = [nm for nm in names if (out / nm).exists()]
    if existing and not force:
        raise click.ClickException(f"{out / existing[0]} exists: pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    vdtype = VALUE_DTYPES[spec.value_dtype]
    if vdtype == BFLOAT16:
        vdtype = np.dtype(np.float32)
    bar = progress_bar(info.count, 0, f"export {bank_name}", progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(bar)
        w_ids = stack.enter_context(output.NpyWriter(out / "ids.npy", np.int64, ()))
        w_keys = stack.enter_context(output.NpyWriter(out / "keys.npy", np.float32, (spec.dim,)))
        w_vals = (stack.enter_context(output.NpyWriter(out / "values.npy", vdtype,
                                                       (spec.value_dim,)))
                  if spec.value_dim else None)
        for chunk in backend.export(bank_name, chunk_rows=chunk_rows):
            w_ids.write(np.asarray(chunk.ids, dtype=np.int64))
            w_keys.write(np.asarray(chunk.keys, dtype=np.float32))
            if w_vals is not None and chunk.values is not None:
                w_vals.write(np.asarray(chunk.values).astype(vdtype, copy=False))
            bar.update(len(chunk.ids))
        rows = w_ids.rows
    note = " (bfloat16 values saved as float32)" if spec.value_dtype == "bfloat16" else ""
    return (f"exported {output.count(rows)} rows of {what}'{bank_name}' to {out}: "
            f"{', '.join(names)}{note}")


def export_options(fn):
    fn = progress_options(fn)
    fn = click.option("--force", "-f", is_flag=True,
                      help="overwrite existing files in OUTDIR")(fn)
    return click.option("--chunk-rows", type=click.IntRange(1), default=CHUNK_ROWS,
                        show_default=True, help="rows per chunk fetched from the backend")(fn)


@click.command("export")
@click.argument("bank_name", metavar="BANK")
@click.argument("outdir", type=click.Path(file_okay=False))
@export_options
@with_backend
def export(backend, bank_name, outdir, chunk_rows, force, progress, quiet):
    """Write BANK to OUTDIR/ids.npy, keys.npy and values.npy.

    ids are int64 (n,), keys float32 (n, dim), values (n, value_dim) in the
    bank's dtype, except bfloat16 values, which are saved as float32 (numpy
    cannot save bfloat16 .npy files portably; the conversion is exact).
    Key-only banks get no values.npy.

    \b
    Example:
        memctl export wiki backup/wiki
        memctl import wiki-copy backup/wiki/keys.npy backup/wiki/values.npy
    """
    click.echo(export_bank(backend, bank_name, outdir, chunk_rows=chunk_rows, force=force,
                           progress=False if quiet else progress))


def bank_stack(names: list[str], biases, bank_ks, excludes) -> list[BankQuery]:
    """BankQuery entries for BANKS and the per-bank options; every option must name one."""
    known = set(names)
    opts: dict[str, dict] = {n: {} for n in names}
    for flag, pairs, field in (("--bias", biases, "bias"), ("--bank-k", bank_ks, "k"),
                               ("--exclude", [(b, False) for b in excludes], "include")):
        for bank_name, value in pairs:
            if bank_name not in known:
                raise click.BadParameter(
                    f"bank '{bank_name}' is not one of the banks searched ({', '.join(names)})",
                    param_hint=f"'{flag}'")
            if field in opts[bank_name]:
                raise click.BadParameter(f"bank '{bank_name}' is named twice",
                                         param_hint=f"'{flag}'")
            opts[bank_name][field] = value
    for bank_name, o in opts.items():
        if o.get("k") is not None and o["k"] < 1:
            raise click.BadParameter(f"k of bank '{bank_name}' must be at least 1",
                                     param_hint="'--bank-k'")
    return [BankQuery(n, **opts[n]) for n in names]


@click.command("search")
@click.argument("banks", metavar="BANK[,BANK2...]")
@click.argument("queries_path", metavar="QUERIES.npy", type=click.Path(dir_okay=False))
@click.option("-k", "k", type=click.IntRange(1), default=8, show_default=True,
              help="results per query")
@click.option("--bias", "biases", multiple=True, type=BankValueType(float, "SCORE"),
              help="shift this bank's scores in its favour (repeatable): wiki=0.1")
@click.option("--bank-k", "bank_ks", multiple=True, type=BankValueType(int, "K"),
              help="candidates this bank contributes before the merge (repeatable): wiki=4")
@click.option("--exclude", "excludes", multiple=True, metavar="BANK",
              help="leave this bank of the stack out (repeatable)")
@click.option("--values", "with_values", is_flag=True, help="show (the start of) each value")
@click.option("--limit-queries", type=click.IntRange(1), default=None, metavar="N",
              help="only the first N queries [default: all]")
@json_option
@with_backend
def search(backend, banks, queries_path, k, biases, bank_ks, excludes, with_values,
           limit_queries, as_json):
    """Look up the top-k of each query in one or more banks (a debugging view).

    Scores are squared L2 distances (metric l2, smaller is better) or inner
    products (metric ip); with several banks one top-k is kept over all.
    --bias, --bank-k and --exclude tune one bank of the stack each; scores
    shown are the biased ones.

    \b
    Example:
        memctl search wiki queries.npy -k 8
        memctl search wiki,medical queries.npy -k 4 --values --limit-queries 2 --json
        memctl search wiki,med,chat-42 q.npy --bias chat-42=0.1 --bank-k wiki=4 --exclude med
    """
    names = [b.strip() for b in banks.split(",") if b.strip()]
    if not names:
        raise click.ClickException("name at least one bank")
    stack = bank_stack(names, biases, bank_ks, excludes)
    active = [b.name for b in stack if b.include]
    if not active:
        raise click.BadParameter("every bank of the search is excluded: keep at least one",
                                 param_hint="'--exclude'")
    q = load_npy(queries_path, "queries")
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2:
        raise click.ClickException(f"{queries_path} has shape {q.shape}: queries must be 2-d")
    dim = backend.bank_info(active[0]).spec.dim
    if q.shape[1] != dim:
        raise click.ClickException(f"{queries_path} has dim {q.shape[1]} but bank "
                                   f"'{active[0]}' has dim {dim}")
    if limit_queries is not None:
        q = q[:limit_queries]
    if q.shape[0] == 0:
        raise click.ClickException(f"{queries_path} holds no queries")
    plain = all(b == BankQuery(b.name) for b in stack)
    result = backend.search(names if plain else stack, np.ascontiguousarray(q, dtype=np.float32),
                            k, values=with_values, keys=False)
    if not with_values:
        result.values = None
    if as_json:
        click.echo(output.to_json([{"query": i, "results": output.search_rows(result, names, i)}
                                   for i in range(result.ids.shape[0])]))
    else:
        click.echo(output.search_text(result, names))
