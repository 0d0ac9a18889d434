"""Channels: addresses, message limits and call metadata, for both ends.

Message size: requests may be large (a 64 MiB query batch), so both ends of
OUR client and server accept MAX_MESSAGE_BYTES per message; but every
streamed reply piece fits gRPC's default 4 MiB receive limit, framing
included (memoryd.wire.streams), so a client on default channel options
(any language) reads every stream.
"""
from __future__ import annotations

import errno
import os
import socket

from memoryd.errors import Unavailable

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# OUR client's channel: the same limits, and server-streaming calls (Search,
# Get, Export) driven in the calling thread. By default gRPC Python starts a
# "channel spin" thread for each such call when none is in flight (every
# sequential search) and hands each reply message over from it: ~0.2-0.5 ms a
# decode-sized search on 2 busy cores, and more at p99. The option is gRPC
# Python's own (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream);
# a call's reply must then be read by one thread at a time, as ours are.
# A daemon that restarts (a shard after a crash) is dialled again within 1 s:
# gRPC's default reconnect backoff grows to 120 s, so a client (a router) would
# keep failing fast long after the daemon is back.
CLIENT_OPTIONS = [*CHANNEL_OPTIONS, ("SingleThreadedUnaryStream", 1),
                  ("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 1000)]
# gRPC sets SO_REUSEPORT by default, which lets a second daemon bind the same
# TCP port silently; a busy port must be an error instead.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
# call metadata: who is calling, printable ASCII ("<host>:<pid>" by default;
# the daemon's Stats.stacks shows it; without it the daemon uses the peer address)
CLIENT_METADATA = "x-memoryd-client"
# call metadata: the API token, `Bearer mdt_<id>_<secret>` (memoryd.auth; the
# standard HTTP header, so proxies and other-language clients know it)
AUTH_METADATA = "authorization"


def grpc_target(address: str) -> str:
    """A gRPC target for 'unix:///abs.sock', 'unix:rel.sock', 'host:port' or a bare path."""
    return f"unix://{address}" if address.startswith("/") else address


def socket_path(address: str) -> str | None:
    """The file of a 'unix://' or 'unix:' address, None for anything else (TCP)."""
    if address.startswith("unix://"):
        return address[len("unix://"):]
    if address.startswith("unix:"):
        return address[len("unix:"):]
    return None


def probe(address: str, timeout: float = 2.0) -> None:
    """Unavailable at once when nothing listens at address (no socket file,
    connection refused); returns when something accepts a connection. gRPC
    itself would retry with backoff until its deadline."""
    path = socket_path(grpc_target(address))
    try:
        if path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(path)
            return
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise Unavailable(f"no memoryd listening at {address}: {os.strerror(e.errno or errno.ECONNREFUSED)}") \
            from None
    except (OSError, ValueError):
        return          # another failure (a timeout, a name to resolve): let gRPC judge it
