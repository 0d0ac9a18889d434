"""TLS for TCP: the daemon's certificate, and mutual TLS (client certificates).

    daemon   memoryd serve --listen 0.0.0.0:7443 --tls-cert server.pem --tls-key server.key
             [--tls-client-ca ca.pem]     (mutual TLS: only clients with a cert it signed)
    client   MemoryClient("host:7443", tls=ClientTLS(ca="ca.pem"[, cert=, key=]))
             memctl --tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]

Files are PEM and read once, when the server or the channel is made. TLS
guards the bytes on the wire (tokens included); who may do what is the
tokens' business (memoryd.auth), so mutual TLS and tokens stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from memoryd.errors import InvalidArgument

PathLike = str | Path


def read_pem(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"the {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The daemon's side: its certificate chain and key; client_ca turns on
    mutual TLS (a client must present a certificate that CA signed)."""

    cert: PathLike
    key: PathLike
    client_ca: PathLike | None = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = (read_pem(self.key, "TLS key"), read_pem(self.cert, "TLS certificate"))
        ca = read_pem(self.client_ca, "TLS client CA")
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """The client's side: the CA that signed the daemon's certificate (None:
    the system's roots) and, for mutual TLS, the client's own cert and key.
    server_name: the name to check the certificate against when it is not
    the address's host (e.g. dialing an IP whose cert names a host)."""

    ca: PathLike | None = None
    cert: PathLike | None = None
    key: PathLike | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("a TLS client certificate needs its key, and the key its "
                                  "certificate (give both or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "TLS CA"),
            private_key=read_pem(self.key, "TLS client key"),
            certificate_chain=read_pem(self.cert, "TLS client certificate"))

    def options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [
            ("grpc.ssl_target_name_override", self.server_name)]


def secure_channel(target: str, tls: ClientTLS, options: list) -> grpc.Channel:
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])
