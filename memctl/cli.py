"""memctl: administer memoryd memory banks.

Every command is a thin wrapper over the MemoryBackend interface
(memoryd.api): it talks either to a running daemon (--address, through
knnlayer.client.MemoryClient) or opens a data directory in-process
(--data-dir, through memoryd.local.LocalMemory). Errors are reported as one
line and a non-zero exit status.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Iterator

import click
import numpy as np

import memoryd
from memoryd import errors
from memoryd.api import KINDS, METRICS, BankSpec
from memoryd.arrays import BFLOAT16, VALUE_DTYPES
from memoryd.sizes import format_size, parse_size
from memctl import output

DEFAULT_SOCKET = Path("mem") / "memoryd.sock"
ADDRESS_ENV = ["MEMCTL_ADDRESS", "MEMORYD_ADDRESS"]
DEBUG_ENV = "MEMCTL_DEBUG"


# ---- errors -------------------------------------------------------------------

def _one_line(msg: str) -> str:
    return "; ".join(part.strip() for part in str(msg).splitlines() if part.strip()) or "error"


@contextlib.contextmanager
def cli_errors(where: str = "") -> Iterator[None]:
    """Turn backend/user errors into one-line ClickExceptions (exit 1).

    Set MEMCTL_DEBUG=1 to see the traceback of unexpected errors instead.
    """
    try:
        yield
    except (click.ClickException, click.Abort, click.exceptions.Exit):
        raise
    except errors.Unavailable as e:
        msg = str(e) if "memoryd" in str(e) else f"{where}unavailable: {e}"
        raise click.ClickException(_one_line(msg)) from e
    except (errors.MemoryError, ValueError, OSError) as e:
        raise click.ClickException(_one_line(str(e) or type(e).__name__)) from e
    except Exception as e:  # noqa: BLE001 - a CLI prints, it does not trace
        if os.environ.get(DEBUG_ENV):
            raise
        raise click.ClickException(_one_line(
            f"unexpected {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for a traceback)")) from e


# ---- parameter types ------------------------------------------------------------

class SizeType(click.ParamType):
    """'10GB', '512MiB', '4096', 'unlimited' -> bytes (None for unlimited)."""

    name = "size"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


# ---- backend selection ------------------------------------------------------------

def _normalise_address(address: str) -> str:
    """A socket file path becomes a unix:// address; anything else is kept."""
    if "://" in address or address.startswith("unix:"):
        return address
    if address.endswith(".sock") or os.path.sep in address or os.path.exists(address):
        return "unix://" + os.path.abspath(address)
    return address


def resolve_target(ctx: click.Context, address: str | None,
                   data_dir: str | None) -> tuple[str, str]:
    """('address', addr) or ('data_dir', path), following the documented rules."""
    if address and data_dir:
        from click.core import ParameterSource

        cmdline = ParameterSource.COMMANDLINE
        a_cli = ctx.get_parameter_source("address") == cmdline
        d_cli = ctx.get_parameter_source("data_dir") == cmdline
        if a_cli == d_cli:
            raise click.UsageError("pass either --address or --data-dir, not both")
        return ("address", _normalise_address(address)) if a_cli else ("data_dir", data_dir)
    if address:
        return "address", _normalise_address(address)
    if data_dir:
        return "data_dir", data_dir
    if DEFAULT_SOCKET.exists():
        return "address", "unix://" + str(DEFAULT_SOCKET.resolve())
    raise click.ClickException("no daemon address: pass --address or --data-dir "
                               f"(or start memoryd with its socket at ./{DEFAULT_SOCKET})")


def open_backend(target: tuple[str, str], catalog_url: str | None, timeout: float | None):
    kind, where = target
    if kind == "address":
        from knnlayer.client import MemoryClient

        if timeout is not None:  # also bounds the wait for the daemon to answer
            return MemoryClient(where, timeout=timeout, wait_ready=timeout)
        return MemoryClient(where)
    from memoryd.local import LocalMemory

    return LocalMemory(where, catalog_url=catalog_url)


def describe_target(target: tuple[str, str]) -> str:
    kind, where = target
    return f"daemon at {where}" if kind == "address" else f"embedded ({where})"


def with_backend(fn):
    """Shared backend options; the command receives an open `backend` as its
    first argument, and it is closed when the command returns."""

    @functools.wraps(fn)
    def wrapper(*args, address, data_dir, catalog_url, timeout, **kwargs):
        ctx = click.get_current_context()
        target = resolve_target(ctx, address, data_dir)
        where = f"memoryd at {target[1]} " if target[0] == "address" else ""
        ctx.meta["memctl.target"] = target
        with cli_errors(where):
            backend = open_backend(target, catalog_url, timeout)
        try:
            with cli_errors(where):
                return fn(backend, *args, **kwargs)
        finally:
            with cli_errors(where):
                backend.close()

    options = [
        click.option("--address", "-a", envvar=ADDRESS_ENV, metavar="ADDR",
                     help="memoryd address: host:port, unix:///path or a socket path "
                          "[env MEMCTL_ADDRESS, MEMORYD_ADDRESS; default ./mem/memoryd.sock "
                          "if it exists]"),
        click.option("--data-dir", "-d", envvar="MEMORYD_DATA_DIR", metavar="DIR",
                     type=click.Path(file_okay=False),
                     help="open this data directory in-process instead of talking to a "
                          "daemon [env MEMORYD_DATA_DIR]"),
        click.option("--catalog-url", envvar="MEMORYD_CATALOG_URL", metavar="URL",
                     help="SQLAlchemy URL of the catalog, with --data-dir "
                          "[default: SQLite in the data dir]"),
        click.option("--timeout", type=float, envvar="MEMCTL_TIMEOUT", metavar="SECONDS",
                     help="per-call deadline when talking to a daemon"),
    ]
    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True,
                        help="print JSON instead of text")(fn)


def _load_npy(path: str, what: str) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise click.ClickException(f"{what} file not found: {path}") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is not a readable .npy array: {e}") from None
    if not isinstance(a, np.ndarray):
        raise click.ClickException(f"{path} must be a single .npy array, not an .npz archive")
    return a


# ---- the group ------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(memoryd.__version__, prog_name="memctl")
def main():
    """Administer memoryd memory banks: create, size, fill, inspect, export.

    Talks to a running daemon (--address, or ./mem/memoryd.sock when it
    exists) or opens a data directory in-process (--data-dir).

    \b
    Example:
        memctl --help
        memctl bank create wiki --kind base --dim 128 --value-dim 128 --quota 10GB --index HNSW32
        memctl import wiki keys.npy values.npy
        memctl status
    """


@main.group()
def bank():
    """Create, list, inspect, freeze, resize and delete banks.

    \b
    Example:
        memctl bank create wiki --dim 128 --value-dim 128 --quota 10GB
        memctl bank list
    """


@bank.command("create")
@click.argument("name")
@click.option("--dim", type=click.IntRange(1), required=True, help="key dimension")
@click.option("--value-dim", type=click.IntRange(0), default=0, show_default=True,
              help="value dimension (0: the bank holds keys only)")
@click.option("--kind", type=click.Choice(KINDS), default="domain", show_default=True,
              help="base (pre-trained, frozen later), domain, or session memory")
@click.option("--value-dtype", type=click.Choice(list(VALUE_DTYPES)), default="float32",
              show_default=True, help="how values are stored")
@click.option("--metric", type=click.Choice(METRICS), default="l2", show_default=True,
              help="l2 (squared distance, smaller is better) or ip (inner product)")
@click.option("--index", "index_spec", default="Flat", show_default=True, metavar="SPEC",
              help="faiss index_factory spec: Flat, HNSW32, IVF1024,Flat, ...")
@click.option("--shards", type=click.IntRange(1), default=1, show_default=True,
              help="number of index shards")
@click.option("--quota", type=SIZE, default=None, metavar="SIZE",
              help="byte quota: 10GB, 512MiB, unlimited [default: unlimited]")
@click.option("--tenant", default="default", show_default=True, help="owning tenant")
@json_option
@with_backend
def bank_create(backend, name, dim, value_dim, kind, value_dtype, metric, index_spec,
                shards, quota, tenant, as_json):
    """Create bank NAME.

    \b
    Example:
        memctl bank create wiki --kind base --dim 128 --value-dim 128 --quota 10GB --index HNSW32
        memctl bank create chat-42 --kind session --dim 64 --value-dim 64 --value-dtype bfloat16
    """
    spec = BankSpec(name=name, dim=dim, value_dim=value_dim, kind=kind,
                    value_dtype=value_dtype, metric=metric, index=index_spec, shards=shards,
                    quota_bytes=quota, tenant=tenant).validated()
    info = backend.create_bank(spec)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
        return
    s = info.spec
    click.echo(f"created bank '{s.name}': {s.kind}, dim {s.dim}, values "
               f"{output.values_desc(info)}, {s.metric}, {s.index}, {s.shards} shard"
               f"{'s' if s.shards != 1 else ''}, quota {format_size(s.quota_bytes)}")


@bank.command("list")
@click.option("--tenant", default=None, help="only this tenant's banks [default: all]")
@json_option
@with_backend
def bank_list(backend, tenant, as_json):
    """List banks with their shape, usage and quota.

    \b
    Example:
        memctl bank list
        memctl bank list --tenant acme --json
    """
    banks = backend.list_banks(tenant)
    if as_json:
        click.echo(output.to_json([b.to_dict() for b in banks]))
    elif not banks:
        click.echo("no banks" + (f" for tenant '{tenant}'" if tenant else ""))
    else:
        click.echo(output.bank_table(banks))


@bank.command("show")
@click.argument("name")
@json_option
@with_backend
def bank_show(backend, name, as_json):
    """Show everything about bank NAME.

    \b
    Example:
        memctl bank show wiki
        memctl bank show wiki --json
    """
    info = backend.bank_info(name)
    click.echo(output.to_json(info.to_dict()) if as_json else output.bank_block(info))


@bank.command("delete")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@with_backend
def bank_delete(backend, name, yes):
    """Delete bank NAME and all its keys and values (asks first).

    \b
    Example:
        memctl bank delete chat-42
        memctl bank delete chat-42 --yes
    """
    info = backend.bank_info(name)
    if not yes:
        click.confirm(f"delete bank '{name}' with {output.count(info.count)} items "
                      f"({format_size(info.used_bytes)})?", abort=True, err=True)
    released = backend.delete_bank(name)
    click.echo(f"deleted bank '{name}' (released {format_size(released)})")


@bank.command("freeze")
@click.argument("name")
@json_option
@with_backend
def bank_freeze(backend, name, as_json):
    """Make bank NAME read-only and checksum it (e.g. a base bank after pre-training).

    \b
    Example:
        memctl bank freeze wiki
    """
    info = backend.freeze_bank(name)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"froze bank '{name}': {output.count(info.count)} items, "
                   f"checksum {info.checksum or '-'}")


@bank.command("resize")
@click.argument("name")
@click.option("--quota", type=SIZE, required=True, metavar="SIZE",
              help="new byte quota: 50GB, 512MiB, or unlimited")
@json_option
@with_backend
def bank_resize(backend, name, quota, as_json):
    """Set the byte quota of bank NAME (grow memory without retraining).

    \b
    Example:
        memctl bank resize wiki --quota 50GB
        memctl bank resize wiki --quota unlimited
    """
    old = backend.bank_info(name)
    info = backend.set_quota(name, quota)
    if as_json:
        click.echo(output.to_json(info.to_dict()))
    else:
        click.echo(f"bank '{name}' quota: {format_size(old.spec.quota_bytes)} -> "
                   f"{format_size(info.spec.quota_bytes)} (used {format_size(info.used_bytes)}, "
                   f"{output.percent(info.used_bytes, info.spec.quota_bytes)})")


# ---- data commands ------------------------------------------------------------------

def _progress(total: int, initial: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="rows", unit_scale=True,
                file=sys.stderr, disable=(None if enabled is None else not enabled),
                dynamic_ncols=True, leave=True)


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


@main.command("import")
@click.argument("bank_name", metavar="BANK")
@click.argument("keys_path", metavar="KEYS.npy", type=click.Path(dir_okay=False))
@click.argument("values_path", metavar="[VALUES.npy]", required=False,
                type=click.Path(dir_okay=False))
@click.option("--batch-size", type=click.IntRange(1), default=65536, show_default=True,
              help="rows per add call; each batch is stored atomically")
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, metavar="ROW",
              help="skip rows before ROW (resume after an interruption)")
@click.option("--ids", "ids_path", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="store row i under the int64 id IDS[i] (e.g. the ids.npy of an export) "
                   "instead of letting the bank assign ids")
@click.option("--ids-out", type=click.Path(dir_okay=False), metavar="IDS.npy",
              help="write the assigned ids here (int64, one per row, -1 = not imported); "
                   "kept and filled in further when resuming with --start")
@click.option("--progress/--no-progress", default=None,
              help="progress bar on stderr [default: when stderr is a terminal]")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
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
    keys = _load_npy(keys_path, "keys")
    values = _load_npy(values_path, "values") if values_path else None
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
    given_ids = _load_npy(ids_path, "ids") if ids_path else None
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
    bar = _progress(n, start, f"import {bank_name}", False if quiet else progress)
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
    elif isinstance(exc, (errors.MemoryError, ValueError, OSError)):
        msg = _one_line(str(exc) or type(exc).__name__)
    else:
        msg = _one_line(f"{type(exc).__name__}: {exc}")
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


@main.command("export")
@click.argument("bank_name", metavar="BANK")
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--chunk-rows", type=click.IntRange(1), default=65536, show_default=True,
              help="rows per chunk fetched from the backend")
@click.option("--force", "-f", is_flag=True, help="overwrite existing files in OUTDIR")
@click.option("--progress/--no-progress", default=None,
              help="progress bar on stderr [default: when stderr is a terminal]")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
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
    bar = _progress(info.count, 0, f"export {bank_name}", False if quiet else progress)
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
    click.echo(f"exported {output.count(rows)} rows of '{bank_name}' to {out}: "
               f"{', '.join(names)}{note}")


@main.command("search")
@click.argument("banks", metavar="BANK[,BANK2...]")
@click.argument("queries_path", metavar="QUERIES.npy", type=click.Path(dir_okay=False))
@click.option("-k", "k", type=click.IntRange(1), default=8, show_default=True,
              help="results per query")
@click.option("--values", "with_values", is_flag=True, help="show (the start of) each value")
@click.option("--limit-queries", type=click.IntRange(1), default=None, metavar="N",
              help="only the first N queries [default: all]")
@json_option
@with_backend
def search(backend, banks, queries_path, k, with_values, limit_queries, as_json):
    """Look up the top-k of each query in one or more banks (a debugging view).

    Scores are squared L2 distances (metric l2, smaller is better) or inner
    products (metric ip); with several banks one top-k is kept over all.

    \b
    Example:
        memctl search wiki queries.npy -k 8
        memctl search wiki,medical queries.npy -k 4 --values --limit-queries 2 --json
    """
    names = [b.strip() for b in banks.split(",") if b.strip()]
    if not names:
        raise click.ClickException("name at least one bank")
    q = _load_npy(queries_path, "queries")
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if q.ndim != 2:
        raise click.ClickException(f"{queries_path} has shape {q.shape}: queries must be 2-d")
    dim = backend.bank_info(names[0]).spec.dim
    if q.shape[1] != dim:
        raise click.ClickException(f"{queries_path} has dim {q.shape[1]} but bank "
                                   f"'{names[0]}' has dim {dim}")
    if limit_queries is not None:
        q = q[:limit_queries]
    if q.shape[0] == 0:
        raise click.ClickException(f"{queries_path} holds no queries")
    result = backend.search(names, np.ascontiguousarray(q, dtype=np.float32), k,
                            values=with_values, keys=False)
    if not with_values:
        result.values = None
    if as_json:
        click.echo(output.to_json([{"query": i, "results": output.search_rows(result, names, i)}
                                   for i in range(result.ids.shape[0])]))
    else:
        click.echo(output.search_text(result, names))


@main.command("status")
@json_option
@with_backend
def status(backend, as_json):
    """Show the daemon (or data dir): version, uptime, GPUs and per-bank usage.

    \b
    Example:
        memctl status
        memctl status --address unix:///run/memoryd/memoryd.sock --json
    """
    st = backend.stats()
    desc = describe_target(click.get_current_context().meta["memctl.target"])
    if as_json:
        click.echo(output.to_json(output.status_dict(st, desc)))
    else:
        click.echo(output.status_text(st, desc))


if __name__ == "__main__":  # pragma: no cover
    main()
