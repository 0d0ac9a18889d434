"""Domain errors of the memory backend, each carrying its gRPC status name.

The backend raises these; the wire's status codec (memoryd.wire.status)
turns them into gRPC statuses on the daemon's side and back into the same
classes on the client's, so callers see the same exception from every
backend. The module is transport-free: codes are the names of
grpc.StatusCode members.
"""
from __future__ import annotations

import re

# google.rpc.ErrorInfo.domain of every error the daemon sends
ERROR_DOMAIN = "memoryd"


class MemorydError(Exception):
    """Base of every error the memory backend raises on purpose."""

    code = "INTERNAL"


class InvalidArgument(MemorydError, ValueError):
    """The request itself is wrong: shapes, dtypes, NaN, k, names."""

    code = "INVALID_ARGUMENT"


class NotFound(MemorydError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownReplyBuffer(NotFound):
    """A search named a reply buffer the daemon no longer has (closed or idle-expired)."""


class AlreadyExists(MemorydError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MemorydError):
    """The request is well formed but the bank's state refuses it."""

    code = "FAILED_PRECONDITION"


class BankFrozen(FailedPrecondition):
    pass


class NeedsTraining(FailedPrecondition):
    pass


class ReplyTooLarge(FailedPrecondition):
    """A SearchOne reply fits no single message (neither the reply buffer nor
    one stream piece): the client makes the same call as the streaming Search."""


class QuotaExceeded(MemorydError):
    """A write would take a bank's (or its tenant's) usage above its quota."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, bank: str, used: int, limit: int, requested: int, scope: str = "bank"):
        from memoryd.sizes import describe_size

        self.bank, self.used, self.limit, self.requested = bank, used, limit, requested
        self.scope = scope  # "bank", or "tenant" (then `bank` names the tenant)
        super().__init__(
            f"quota exceeded for {scope} '{bank}': used {describe_size(used)} + requested "
            f"{describe_size(requested)} > limit {describe_size(limit)}")

    def __reduce__(self):
        return (type(self), (self.bank, self.used, self.limit, self.requested, self.scope))


class Unavailable(MemorydError):
    code = "UNAVAILABLE"


class Unauthenticated(MemorydError):
    """The daemon requires a token (memoryd serve --auth) and the call has none,
    or one it does not know, or a revoked one."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MemorydError):
    """The caller's token is valid but lacks the right (read, write, admin), or
    names another tenant (memoryd.auth.rights)."""

    code = "PERMISSION_DENIED"


class StorageUnwritable(Unavailable):
    """The data dir refused a write (read-only, permissions, I/O error): the
    write did not happen, what is stored is unchanged and reads go on."""

    @staticmethod
    def from_os_error(e: OSError, path) -> "MemorydError":
        """StorageFull for a full disk or quota, StorageUnwritable otherwise."""
        import errno

        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        cls = StorageFull if full else StorageUnwritable
        what = "is full" if full else "cannot be written"
        return cls(f"the data dir {what} ({e.strerror or e}: {path}): the write was not "
                   "applied; stored data is unchanged and reads go on")


class StorageFull(MemorydError):
    """The disk under the data dir is full (or a file may not grow): free space
    or move the data dir; nothing of the refused write was stored."""

    code = "RESOURCE_EXHAUSTED"
    from_os_error = StorageUnwritable.from_os_error


BY_CODE: dict[str, type[MemorydError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                QuotaExceeded, Unavailable, Unauthenticated, PermissionDenied, MemorydError)
}


def reason(cls: type) -> str:
    """google.rpc.ErrorInfo.reason for an error class: BankFrozen -> BANK_FROZEN."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()


# The classes a reason may name; a client never instantiates anything else.
BY_REASON: dict[str, type[MemorydError]] = {reason(c): c for c in (
    InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, BankFrozen,
    NeedsTraining, QuotaExceeded, Unavailable, UnknownReplyBuffer, ReplyTooLarge, StorageFull,
    StorageUnwritable, Unauthenticated, PermissionDenied)}
