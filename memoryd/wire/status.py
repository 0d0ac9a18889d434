"""The status codec: domain errors <-> gRPC statuses, both ends.

Daemon side (`to_status`): a memoryd.errors error becomes a google.rpc.Status
with the error's own code and message, plus details:

  * google.rpc.ErrorInfo, always first: domain "memoryd" (ERROR_DOMAIN),
    reason = the exact class in UPPER_SNAKE_CASE (BankFrozen -> BANK_FROZEN;
    the reasons are errors.BY_REASON's keys), so a client can tell BankFrozen
    from another FailedPrecondition;
  * for QuotaExceeded, ErrorInfo.metadata carries "bank" (the bank's or the
    tenant's name), "used", "limit", "requested" (decimal byte counts) and
    "scope" ("bank", "tenant", "daemon" or "shared memory"), and a
    google.rpc.QuotaFailure follows with one violation whose subject is
    "<scope>:<name>".

Client side (`to_error`): the same class comes back (ErrorInfo.reason wins
when it agrees with the status code; else the code decides), QuotaExceeded
with its numbers; UNAVAILABLE names the address.
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from memoryd import errors


# ---- daemon side ----------------------------------------------------------------

def to_status(err: errors.MemorydError) -> grpc.Status:
    """The grpc.Status to abort a call with for a domain error."""
    code = grpc.StatusCode[err.code]
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []
    if isinstance(err, errors.QuotaExceeded):
        metadata = {"bank": err.bank, "used": str(err.used), "limit": str(err.limit),
                    "requested": str(err.requested), "scope": err.scope}
        failure = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"{err.scope}:{err.bank}",
                description=f"used {err.used} B + requested {err.requested} B "
                            f"> limit {err.limit} B")])
        details.append(_pack(failure))
    info = error_details_pb2.ErrorInfo(
        reason=errors.reason(type(err)), domain=errors.ERROR_DOMAIN, metadata=metadata)
    details.insert(0, _pack(info))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(err),
                                                  details=details))


def code_name(exc: BaseException) -> str:
    """The status code name a domain error is answered with; INTERNAL for anything else."""
    if isinstance(exc, errors.MemorydError) and exc.code in grpc.StatusCode.__members__:
        return exc.code
    return "INTERNAL"


def _pack(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


# ---- client side ----------------------------------------------------------------

def _error_info(e: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(e)
    except (ValueError, AttributeError):   # mismatched or no trailing status
        return None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == errors.ERROR_DOMAIN:
                return info
    return None


def to_error(e: grpc.RpcError, address: str) -> errors.MemorydError:
    """The memoryd.errors exception for a failed call."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    message = e.details() if hasattr(e, "details") else str(e)
    if name == "UNAVAILABLE":
        return errors.Unavailable(f"memoryd at {address} is unavailable: {message}")
    info = _error_info(e)
    cls = errors.BY_REASON.get(info.reason) if info is not None else None
    if cls is errors.QuotaExceeded:
        m = info.metadata
        try:
            return errors.QuotaExceeded(m["bank"], int(m["used"]), int(m["limit"]),
                                        int(m["requested"]), scope=m.get("scope", "bank"))
        except (KeyError, ValueError):
            cls = None                      # malformed details: fall back to the code
    if cls is None or cls.code != name:
        cls = errors.BY_CODE.get(name)
    if cls is None or cls is errors.QuotaExceeded:
        err = errors.MemorydError(f"{name}: {message}")
        err.code = name                     # keep e.g. DEADLINE_EXCEEDED visible
        return err
    return cls(message)
