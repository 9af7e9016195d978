"""Typed exceptions, one per forkd error code (the daemon's gRPC status codes)."""

from __future__ import annotations

from typing import Optional

import grpc


class ForkdError(Exception):
    """Base of every error the SDK raises. ``code`` is forkd's stable error code."""

    code = "internal"

    def __init__(self, message: str, *, retry_after_ms: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        #: RESOURCE_EXHAUSTED only: when the daemon expects room again.
        self.retry_after_ms = retry_after_ms


class NotFound(ForkdError):
    """No sandbox, snapshot, template, image or file by that name."""

    code = "not_found"


class InvalidArgument(ForkdError):
    """The request was malformed; the message says which field and why."""

    code = "invalid_argument"


class FailedPrecondition(ForkdError):
    """The request is valid but the state does not allow it (e.g. the sandbox exited)."""

    code = "failed_precondition"


class ResourceExhausted(ForkdError):
    """The daemon is at a configured limit; retry after ``retry_after_ms``."""

    code = "resource_exhausted"


class Unavailable(ForkdError):
    """The daemon (or the sandbox's agent) cannot be reached."""

    code = "unavailable"


class DeadlineExceeded(ForkdError):
    """The call took longer than its timeout."""

    code = "deadline_exceeded"


class Cancelled(ForkdError):
    """The call was cancelled."""

    code = "cancelled"


class Unauthenticated(ForkdError):
    """TCP only: the bearer token is missing or wrong."""

    code = "unauthenticated"


class InternalError(ForkdError):
    """A bug or an unexpected host failure; the message has the detail."""

    code = "internal"


_BY_STATUS = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError, target: str) -> ForkdError:
    """The typed exception for a failed call (``error`` is a grpc.Call as well)."""
    code = error.code()  # type: ignore[attr-defined]
    message = error.details() or str(code)  # type: ignore[attr-defined]
    retry = None
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "retry-after-ms":
            try:
                retry = int(value)
            except ValueError:
                pass
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in message:
        message = (
            f"cannot reach the forkd daemon at {target} ({message}); start it with "
            "`forkd daemon`, or point FORKD_SOCKET (or FORKD_ADDRESS) at a running one"
        )
    cls = _BY_STATUS.get(code, InternalError)
    return cls(message, retry_after_ms=retry)
