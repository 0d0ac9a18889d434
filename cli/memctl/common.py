"""What every memctl command shares: one-line errors, parameter types (sizes,
durations, BANK=VALUE pairs), backend selection and the backend options.

The backend options (--address, --data-dir, --catalog-url, --timeout, and for
a daemon --token and --tls-ca/--tls-cert/--tls-key) are
accepted both on the group (`memctl --address X bank list`) and on each
command (`memctl bank list --address X`); `with_backend` resolves them in
this order: the command's command line, the group's command line, the
environment, the default socket ./mem/memoryd.sock.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from memoryd import errors
from memoryd.sizes import parse_size

DEFAULT_SOCKET = Path("mem") / "memoryd.sock"
ADDRESS_ENV = ["MEMCTL_ADDRESS", "MEMORYD_ADDRESS"]
DEBUG_ENV = "MEMCTL_DEBUG"
BACKEND_PARAMS = ("address", "data_dir", "catalog_url", "timeout", "token", "tls_ca", "tls_cert",
                  "tls_key")
TOKEN_ENV = "MEMCTL_TOKEN"


# ---- errors -------------------------------------------------------------------

def one_line(msg: str) -> str:
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
        raise click.ClickException(one_line(msg)) from e
    except errors.MemorydError as e:
        if getattr(e, "code", "") == "UNIMPLEMENTED":   # an older daemon
            raise click.ClickException(one_line(
                f"{where or 'memoryd '}does not offer this command (upgrade memoryd): {e}")) from e
        raise click.ClickException(one_line(str(e) or type(e).__name__)) from e
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(str(e) or type(e).__name__)) from e
    except Exception as e:  # noqa: BLE001 - a CLI prints, it does not trace
        if os.environ.get(DEBUG_ENV):
            raise
        raise click.ClickException(one_line(
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

_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[a-z]+)+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([a-z]*)")


def parse_duration(text: str | float) -> float:
    """Seconds for '90s', '30m', '2h', '1d', '1h30m' or a bare number of seconds.

    Raises ValueError for anything else, zero included.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = _DURATION_PART.findall(s) if _DURATION.fullmatch(s) else []
        if not parts or any(u and u not in _DURATION_UNITS for _, u in parts):
            raise ValueError(f"not a duration: {text!r} (examples: 90s, 30m, 2h, 1d, 1h30m)")
        seconds = sum(float(n) * _DURATION_UNITS.get(u, 1) for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be longer than zero; got {text!r}")
    return seconds


class DurationType(click.ParamType):
    """'90s', '30m', '2h', '1d', '1h30m', '45' (seconds) -> seconds (float)."""

    name = "duration"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = DurationType()


class BankValueType(click.ParamType):
    """'BANK=VALUE' -> (bank, value), VALUE converted by `cast`."""

    def __init__(self, cast, what: str):
        self.cast, self.what, self.name = cast, what, f"BANK={what}"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        bank, sep, raw = str(value).partition("=")
        if not sep or not bank.strip() or not raw.strip():
            self.fail(f"expected BANK={self.what}, e.g. wiki=0.1; got {value!r}", param, ctx)
        try:
            return bank.strip(), self.cast(raw.strip())
        except ValueError:
            self.fail(f"{raw.strip()!r} in {value!r} is not {self.what}", param, ctx)


# ---- backend selection ------------------------------------------------------------

def _normalise_address(address: str) -> str:
    """A socket file path becomes a unix:// address; anything else is kept."""
    if "://" in address or address.startswith("unix:"):
        return address
    if address.endswith(".sock") or os.path.sep in address or os.path.exists(address):
        return "unix://" + os.path.abspath(address)
    return address


# where a backend option's value came from; higher wins
_FROM_COMMAND, _FROM_GROUP, _FROM_ENV, _UNSET = 3, 2, 1, 0


def backend_settings(ctx: click.Context, given: dict) -> dict[str, tuple]:
    """{param: (value, rank)} for the backend options of the running command.

    `given` holds the command's own values (command line or environment); the
    group's values (command line only) come from the root context.
    """
    from click.core import ParameterSource

    root = ctx.find_root()
    out = {}
    for name in BACKEND_PARAMS:
        value = given.get(name)
        if value is not None and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            out[name] = (value, _FROM_COMMAND)
        elif root is not ctx and root.params.get(name) is not None:
            out[name] = (root.params[name], _FROM_GROUP)
        elif value is not None:
            out[name] = (value, _FROM_ENV)
        else:
            out[name] = (None, _UNSET)
    return out


def resolve_target(ctx: click.Context, address: str | None,
                   data_dir: str | None, settings: dict | None = None) -> tuple[str, str]:
    """('address', addr) or ('data_dir', path), following the documented rules."""
    if settings is None:
        settings = backend_settings(ctx, {"address": address, "data_dir": data_dir})
    (address, a_rank), (data_dir, d_rank) = settings["address"], settings["data_dir"]
    if address and data_dir:
        if a_rank == d_rank:
            raise click.UsageError("pass either --address or --data-dir, not both")
        return ("address", _normalise_address(address)) if a_rank > d_rank \
            else ("data_dir", data_dir)
    if address:
        return "address", _normalise_address(address)
    if data_dir:
        return "data_dir", data_dir
    catalog_url = settings.get("catalog_url", (None, _UNSET))[0]
    if catalog_url and _token_command(ctx):   # a cluster's catalog: tokens only
        return "catalog", catalog_url
    if DEFAULT_SOCKET.exists():
        return "address", "unix://" + str(DEFAULT_SOCKET.resolve())
    raise click.ClickException("no daemon address: pass --address or --data-dir "
                               f"(or start memoryd with its socket at ./{DEFAULT_SOCKET})")


def open_backend(target: tuple[str, str], catalog_url: str | None, timeout: float | None,
                 token: str | None = None, tls: tuple = (None, None, None)):
    """tls: (ca, cert, key) files, any of them None; all None: no TLS."""
    kind, where = target
    if kind == "address":
        from knnlayer.client import MemoryClient
        from memoryd.wire.channel import probe
        from memoryd.wire.tls import ClientTLS

        probe(where)             # nothing listening: say so now, not after gRPC's retries
        security = {"token": token or None,
                    "tls": ClientTLS(*tls) if any(tls) else None}
        if timeout is not None:  # also bounds the wait for the daemon to answer
            return MemoryClient(where, timeout=timeout, wait_ready=timeout, **security)
        return MemoryClient(where, **security)
    if kind == "catalog":
        from memoryd.engine.tokens import CatalogTokens

        return CatalogTokens(where)
    from memoryd.engine import LocalMemory

    return LocalMemory(where, catalog_url=catalog_url)


def _token_command(ctx: click.Context) -> bool:
    """True inside `memctl token ...`, the one group that runs on a catalog alone."""
    return ctx.parent is not None and ctx.parent.info_name == "token"


def describe_target(target: tuple[str, str]) -> str:
    kind, where = target
    return f"daemon at {where}" if kind == "address" else f"embedded ({where})"


def backend_options(envvars: bool = True) -> list:
    """The click options that choose a backend (with env vars on commands only)."""
    env = (lambda *names: list(names)) if envvars else (lambda *names: None)
    env_note = (lambda text: f" [{text}]") if envvars else (lambda text: "")
    return [
        click.option("--address", "-a", envvar=env(*ADDRESS_ENV), metavar="ADDR",
                     help="memoryd address: host:port, unix:///path or a socket path"
                          + env_note("env MEMCTL_ADDRESS, MEMORYD_ADDRESS; default "
                                     "./mem/memoryd.sock if it exists")),
        click.option("--data-dir", "-d", envvar=env("MEMORYD_DATA_DIR"), metavar="DIR",
                     type=click.Path(file_okay=False),
                     help="open this data directory in-process instead of talking to a "
                          "daemon" + env_note("env MEMORYD_DATA_DIR")),
        click.option("--catalog-url", envvar=env("MEMORYD_CATALOG_URL"), metavar="URL",
                     help="SQLAlchemy URL of the catalog, with --data-dir "
                          "[default: SQLite in the data dir]; alone, for `token` "
                          "commands on a cluster's catalog"),
        click.option("--timeout", type=float, envvar=env("MEMCTL_TIMEOUT"), metavar="SECONDS",
                     help="per-call deadline when talking to a daemon"),
        click.option("--token", envvar=env(TOKEN_ENV), metavar="TOKEN",
                     help="API token sent with every call (a daemon run with --auth needs one)"
                          + env_note(f"env {TOKEN_ENV}")),
        click.option("--tls-ca", envvar=env("MEMCTL_TLS_CA"), metavar="PEM",
                     type=click.Path(dir_okay=False),
                     help="dial the daemon with TLS, trusting this CA"
                          + env_note("env MEMCTL_TLS_CA")),
        click.option("--tls-cert", envvar=env("MEMCTL_TLS_CERT"), metavar="PEM",
                     type=click.Path(dir_okay=False),
                     help="client certificate for a mutual-TLS daemon (with --tls-key)"
                          + env_note("env MEMCTL_TLS_CERT")),
        click.option("--tls-key", envvar=env("MEMCTL_TLS_KEY"), metavar="PEM",
                     type=click.Path(dir_okay=False),
                     help="client key for --tls-cert" + env_note("env MEMCTL_TLS_KEY")),
    ]


def with_backend(fn):
    """Shared backend options; the command receives an open `backend` as its
    first argument, and it is closed when the command returns."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        settings = backend_settings(ctx, {p: kwargs.pop(p) for p in BACKEND_PARAMS})
        target = resolve_target(ctx, None, None, settings)
        where = f"memoryd at {target[1]} " if target[0] == "address" else ""
        ctx.meta["memctl.target"] = target
        with cli_errors(where):
            backend = open_backend(target, settings["catalog_url"][0], settings["timeout"][0],
                                   settings["token"][0],
                                   tuple(settings[p][0] for p in ("tls_ca", "tls_cert",
                                                                  "tls_key")))
        try:
            with cli_errors(where):
                return fn(backend, *args, **kwargs)
        finally:
            with cli_errors(where):
                backend.close()

    for opt in reversed(backend_options()):
        wrapper = opt(wrapper)
    return wrapper


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True,
                        help="print JSON instead of text")(fn)


# ---- files and progress ------------------------------------------------------------

def load_npy(path: str, what: str) -> np.ndarray:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise click.ClickException(f"{what} file not found: {path}") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is not a readable .npy array: {e}") from None
    if not isinstance(a, np.ndarray):
        raise click.ClickException(f"{path} must be a single .npy array, not an .npz archive")
    return a


def progress_bar(total: int, initial: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="rows", unit_scale=True,
                file=sys.stderr, disable=(None if enabled is None else not enabled),
                dynamic_ncols=True, leave=True)


def progress_options(fn):
    fn = click.option("--quiet", "-q", is_flag=True, help="no progress bar")(fn)
    return click.option("--progress/--no-progress", default=None,
                        help="progress bar on stderr [default: when stderr is a terminal]")(fn)
