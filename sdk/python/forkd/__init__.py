"""forkd: microVM sandboxes for AI agents that BRANCH in milliseconds.

    import forkd

    with forkd.Sandbox.create(image="default") as sb:
        sb.exec(["pip", "--version"])
        kids = sb.branch(4)              # four copies of the running VM
        for i, kid in enumerate(kids):
            print(kid.exec(f"echo child {i}").text)

The asyncio twin is ``forkd.aio``. Errors are ``forkd.ForkdError`` subclasses
(``forkd.NotFound``, ``forkd.InvalidArgument``, ...).
"""

from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    ForkdError,
    InternalError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .sandbox import Client, Files, Sandbox, default_client
from .types import (
    Children,
    ContextInfo,
    DirEntry,
    EvalError,
    EvalResult,
    ExecResult,
    ImageInfo,
    SandboxInfo,
    SnapshotInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "Children",
    "Client",
    "ContextInfo",
    "DeadlineExceeded",
    "DirEntry",
    "EvalError",
    "EvalResult",
    "ExecResult",
    "FailedPrecondition",
    "Files",
    "ForkdError",
    "ImageInfo",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Sandbox",
    "SandboxInfo",
    "SnapshotInfo",
    "Unauthenticated",
    "Unavailable",
    "default_client",
]
