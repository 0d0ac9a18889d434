"""The daemon's configuration: one typed dataclass, parsed in one place.

Precedence, lowest first: built-in defaults < TOML file (`--config PATH`)
< environment (MEMORYD_DATA_DIR, MEMORYD_LISTEN, MEMORYD_CATALOG_URL,
MEMORYD_LOG_LEVEL, MEMORYD_METRICS_LISTEN) < command-line flags.

A TOML file holds the same keys as Config, at top level:

    data_dir = "/var/lib/memoryd"        # relative paths: to the file's folder
    listen = "unix:///run/memoryd/memoryd.sock"
    catalog_url = "postgresql+psycopg://memoryd@db/memoryd"
    max_workers = 16
    log_level = "info"
    grace_s = 20
    shm_dir = "/dev/shm"                 # reply buffers for same-host clients; "off" = none
    shm_bytes = "1GiB"                   # all reply buffers together (the default)
    auth = true                          # every RPC but health needs a token (memoryd.auth)
    socket_mode = "0660"                 # of the unix socket (default 0600; 0660 with a group)
    socket_group = "memoryd"             # who may connect besides the daemon's user
    tls_cert = "/etc/memoryd/server.pem" # TLS on a TCP listen address, with tls_key
    tls_key = "/etc/memoryd/server.key"
    tls_client_ca = "/etc/memoryd/ca.pem"   # mutual TLS: clients need a cert this CA signed
    metrics_listen = "127.0.0.1:9464"    # Prometheus /metrics (default off; env
                                         # MEMORYD_METRICS_LISTEN; memoryd.daemon.metrics)

`listen` defaults to the unix socket `<data_dir>/memoryd.sock`; `catalog_url`
defaults to None, which LocalMemory turns into `sqlite:///<data_dir>/catalog.db`.
Relative TLS paths in a file are read relative to the file's folder.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from memoryd.sizes import parse_size
from memoryd.wire import channel
from memoryd.wire.shm import DEFAULT_TOTAL_BYTES
from memoryd.wire.tls import ServerTLS

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 16             # RPC worker threads
GRACE_S = 20.0               # how long in-flight calls may finish on shutdown
ENV = {"data_dir": "MEMORYD_DATA_DIR", "listen": "MEMORYD_LISTEN",
       "catalog_url": "MEMORYD_CATALOG_URL", "log_level": "MEMORYD_LOG_LEVEL",
       "metrics_listen": "MEMORYD_METRICS_LISTEN", "shard_index": "MEMORYD_SHARD_INDEX",
       "num_shards": "MEMORYD_NUM_SHARDS"}
SOCKET_NAME = "memoryd.sock"
UNIX_PATH_MAX = 107          # sun_path is 108 bytes on Linux, with the NUL


class ConfigError(ValueError):
    """The configuration is wrong; the message says where and how."""


@dataclass(frozen=True)
class Config:
    data_dir: Path
    listen: str                       # "unix:///abs.sock", "unix:rel.sock" or "host:port"
    catalog_url: str | None = None    # None: sqlite:///<data_dir>/catalog.db
    max_workers: int = MAX_WORKERS
    log_level: str = "info"
    grace_s: float = GRACE_S
    shm_dir: Path | None = None       # reply buffers' folder; None: /dev/shm if usable
    shm_bytes: int = DEFAULT_TOTAL_BYTES   # all reply buffers together; 0: buffers off
    auth: bool = False                # True: tokens required (memoryd.auth)
    socket_mode: int = 0o600          # of a unix socket; 0o660 by default with socket_group
    socket_group: str | None = None   # group of a unix socket (name or gid)
    tls_cert: Path | None = None      # TLS (TCP only): certificate chain and key, PEM
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: the CA client certs must chain to
    metrics_listen: str | None = None  # "HOST:PORT" of Prometheus metrics (port 0: any); None: off
    shard_index: int = 0              # this process's shard of a cluster (memoryd.cluster) ...
    num_shards: int = 1               # ... of this many; 1: alone

    @property
    def socket_path(self) -> Path | None:
        path = channel.socket_path(self.listen)
        return None if path is None else Path(path)

    @property
    def tls(self) -> ServerTLS | None:
        if self.tls_cert is None:
            return None
        return ServerTLS(self.tls_cert, self.tls_key, self.tls_client_ca)


def load(config_file: str | Path | None = None, env: Mapping[str, str] | None = None,
         **flags: Any) -> Config:
    """Config from defaults < file < env < flags (flags that are None are unset)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if config_file is not None:
        raw.update(_read_toml(Path(config_file)))
    raw.update({k: env[var] for k, var in ENV.items() if env.get(var)})
    raw.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(raw) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    return _typed(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(f.name for f in fields(Config))}")
    # A data dir written in a file is read relative to that file, not to
    # wherever the daemon happens to be started from.
    for key in ("data_dir", "tls_cert", "tls_key", "tls_client_ca"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).expanduser().is_absolute():
            raw[key] = str(path.resolve().parent / raw[key])
    return raw


def _typed(raw: dict[str, Any]) -> Config:
    if not raw.get("data_dir"):
        raise ConfigError("no data dir: pass --data-dir, set MEMORYD_DATA_DIR, "
                          "or set data_dir in the config file")
    data_dir = Path(str(raw["data_dir"])).expanduser().resolve()
    listen = str(raw.get("listen") or f"unix://{data_dir / SOCKET_NAME}")
    path = channel.socket_path(listen)
    if path is not None and len(os.fsencode(str(path))) > UNIX_PATH_MAX:
        raise ConfigError(f"unix socket path {path} is {len(os.fsencode(str(path)))} bytes; "
                          f"the limit is {UNIX_PATH_MAX}: use a shorter --listen path")
    if path is None and ":" not in listen:
        raise ConfigError(f"listen address {listen!r} must be 'unix:///path', 'unix:path' "
                          "or 'host:port'")
    log_level = str(raw.get("log_level", "info")).lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}; got {log_level!r}")
    shm_dir = raw.get("shm_dir")
    shm_bytes = raw.get("shm_bytes", DEFAULT_TOTAL_BYTES)
    if isinstance(shm_bytes, str):
        try:
            shm_bytes = parse_size(shm_bytes)
        except ValueError as e:
            raise ConfigError(f"shm_bytes: {e}") from None
    if str(shm_dir).lower() == "off":
        shm_dir, shm_bytes = None, 0
    return Config(
        **_security(raw, path is not None),
        data_dir=data_dir, listen=listen, catalog_url=raw.get("catalog_url") or None,
        max_workers=_number(raw, "max_workers", MAX_WORKERS, int, 1),
        log_level=log_level, grace_s=_number(raw, "grace_s", GRACE_S, float, 0),
        shm_dir=Path(str(shm_dir)).expanduser() if shm_dir else None,
        shm_bytes=_number({"shm_bytes": shm_bytes}, "shm_bytes", DEFAULT_TOTAL_BYTES, int, 0),
        metrics_listen=parse_metrics_listen(raw.get("metrics_listen")),
        **_shard(raw))


def _shard(raw: dict[str, Any]) -> dict[str, int]:
    """shard_index of num_shards; a cluster's shards share one catalog, so a
    shard must be given its URL (the default SQLite file is its data dir's alone)."""
    count = _number(raw, "num_shards", 1, int, 1)
    index = _number(raw, "shard_index", 0, int, 0)
    if index >= count:
        raise ConfigError(f"shard_index must be below num_shards ({count}); got {index}")
    if count > 1 and not raw.get("catalog_url"):
        raise ConfigError("a shard of a cluster (num_shards > 1) needs the catalog all shards "
                          "share: give --catalog-url (e.g. postgresql+psycopg://...)")
    return {"shard_index": index, "num_shards": count}


def parse_metrics_listen(value: Any) -> str | None:
    """'HOST:PORT' of the metrics endpoint, or None (unset, "" or "off")."""
    if value is None or str(value).strip().lower() in ("", "off"):
        return None
    host, sep, port = str(value).strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics_listen must be HOST:PORT (e.g. 127.0.0.1:9464, :9464 for "
                          f"every interface, port 0 for any free one); got {value!r}")
    return str(value).strip()


def _security(raw: dict[str, Any], unix: bool) -> dict[str, Any]:
    """auth, socket_mode/socket_group and TLS settings, checked together."""
    auth = raw.get("auth", False)
    if not isinstance(auth, bool):
        raise ConfigError(f"auth must be true or false; got {auth!r}")
    group = raw.get("socket_group")
    group = str(group) if group not in (None, "") else None
    mode = raw.get("socket_mode")
    if mode is None:
        mode = 0o660 if group is not None else 0o600
    elif isinstance(mode, str):
        try:
            mode = int(mode.removeprefix("0o"), 8)
        except ValueError:
            raise ConfigError(f"socket_mode must be octal, e.g. 0600 or 0660; got {mode!r}") \
                from None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ConfigError(f"socket_mode must be octal permission bits such as 0600 or 0660 "
                          f"(in TOML: \"0660\" or 0o660); got {mode!r}")
    tls = {k: Path(str(raw[k])).expanduser() if raw.get(k) else None
           for k in ("tls_cert", "tls_key", "tls_client_ca")}
    if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
        raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
    if tls["tls_client_ca"] is not None and tls["tls_cert"] is None:
        raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
    if tls["tls_cert"] is not None and unix:
        raise ConfigError("TLS is for a TCP listen address (host:port); a unix socket is "
                          "guarded by its mode and group (socket_mode, socket_group)")
    for key, p in tls.items():
        if p is not None and not p.is_file():
            raise ConfigError(f"{key}: no such file {p}")
    return {"auth": auth, "socket_mode": mode, "socket_group": group, **tls}


def _number(raw: dict[str, Any], key: str, default, kind: type, minimum):
    value = raw.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        out = kind(value)
        if kind is int and out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a{'n integer' if kind is int else ' number'}; "
                          f"got {value!r}") from None
    if out < minimum:
        raise ConfigError(f"{key} must be >= {minimum}; got {value!r}")
    return out
