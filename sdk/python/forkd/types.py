"""Plain results the SDK returns (no protobuf types leak out), and the requests it builds.

Shared by the blocking API (``forkd``) and the asyncio twin (``forkd.aio``), so both speak the
same wire format and hand back the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

from .v1 import forkd_pb2 as pb

#: Bytes per WriteFile message (the daemon accepts up to 16 MiB per message).
WRITE_CHUNK = 1 << 20

Args = Union[str, Sequence[str]]


@dataclass(frozen=True)
class SandboxInfo:
    """What the daemon knows about a sandbox."""

    id: str
    state: str  # "running" or "exited"
    image: str
    memory_mib: int
    vcpus: int
    labels: Dict[str, str]
    created_unix_ms: int
    parent: Optional[str]
    template: Optional[str]
    exit_reason: Optional[str]
    restored_from: Optional[str]

    @classmethod
    def _from_pb(cls, s: pb.Sandbox) -> "SandboxInfo":
        state = {pb.SANDBOX_STATE_RUNNING: "running", pb.SANDBOX_STATE_EXITED: "exited"}.get(s.state, "unknown")
        return cls(
            id=s.id,
            state=state,
            image=s.image,
            memory_mib=s.memory_mib,
            vcpus=s.vcpus,
            labels=dict(s.labels),
            created_unix_ms=s.created_unix_ms,
            parent=s.parent or None,
            template=s.template or None,
            exit_reason=s.exit_reason or None,
            restored_from=s.restored_from or None,
        )


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its output, and how it ended (shell convention for ``exit_code``)."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: Optional[int] = None
    timed_out: bool = False
    duration_ms: float = 0.0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class EvalError:
    """The exception a snippet raised."""

    name: str
    message: str
    traceback: str


@dataclass(frozen=True)
class EvalResult:
    """A finished snippet: its output, the final expression's value, or the exception."""

    context: str
    value: Optional[str]
    json: Optional[str]
    error: Optional[EvalError]
    stdout: bytes
    stderr: bytes
    duration_ms: float
    created: bool
    restarted: bool
    timed_out: bool

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class ContextInfo:
    name: str
    lang: str
    pid: int
    evals: int
    version: str


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: str  # "file", "dir", "symlink" or "other"
    size: int
    mode: int
    mtime_unix: int


@dataclass(frozen=True)
class SnapshotInfo:
    """A durable snapshot (or, from ``snapshot(wait=False)``, one still being written)."""

    id: str
    tag: Optional[str]
    kind: str  # "full" or "diff"
    parent: Optional[str]
    source: str
    pause_ms: float = 0.0
    durable: bool = True
    image: Optional[str] = None
    memory_mib: int = 0
    memory_bytes: int = 0
    created_unix_ms: int = 0

    @classmethod
    def _from_result(cls, r: pb.SnapshotResult) -> "SnapshotInfo":
        return cls(
            id=r.id,
            tag=r.tag or None,
            kind=r.kind,
            parent=r.parent or None,
            source=r.source,
            pause_ms=r.pause_ms,
            durable=r.durable,
        )

    @classmethod
    def _from_info(cls, s: pb.SnapshotInfo) -> "SnapshotInfo":
        return cls(
            id=s.id,
            tag=s.tag or None,
            kind=s.kind,
            parent=s.parent or None,
            source=s.source,
            image=s.image,
            memory_mib=s.memory_mib,
            memory_bytes=s.memory_bytes,
            created_unix_ms=s.created_unix_ms,
        )


@dataclass(frozen=True)
class ImageInfo:
    name: str
    kind: str
    size_bytes: int
    sha256: str


@dataclass
class _Output:
    """Collects a streamed command's output, calling the user's callbacks as chunks arrive."""

    on_stdout: Optional[object] = None
    on_stderr: Optional[object] = None
    stdout: List[bytes] = field(default_factory=list)
    stderr: List[bytes] = field(default_factory=list)

    def feed(self, event: Union[pb.ExecEvent, pb.EvalEvent]) -> None:
        kind = event.WhichOneof("event")
        if kind == "stdout":
            self.stdout.append(event.stdout)
            if callable(self.on_stdout):
                self.on_stdout(event.stdout)
        elif kind == "stderr":
            self.stderr.append(event.stderr)
            if callable(self.on_stderr):
                self.on_stderr(event.stderr)

    def exec_result(self, exit: Optional[pb.ExecExit]) -> ExecResult:
        if exit is None:
            from .errors import InternalError

            raise InternalError("the command's output ended without an exit status")
        return ExecResult(
            stdout=b"".join(self.stdout),
            stderr=b"".join(self.stderr),
            exit_code=exit.exit_code,
            signal=exit.signal if exit.HasField("signal") else None,
            timed_out=exit.timed_out,
            duration_ms=exit.duration_ms,
        )

    def eval_result(self, r: Optional[pb.EvalResult]) -> EvalResult:
        if r is None:
            from .errors import InternalError

            raise InternalError("the snippet's output ended without a result")
        error = EvalError(r.error.name, r.error.message, r.error.traceback) if r.HasField("error") else None
        return EvalResult(
            context=r.context,
            value=r.value if r.HasField("value") else None,
            json=r.json if r.HasField("json") else None,
            error=error,
            stdout=b"".join(self.stdout),
            stderr=b"".join(self.stderr),
            duration_ms=r.duration_ms,
            created=r.created,
            restarted=r.restarted,
            timed_out=r.timed_out,
        )


def limits_pb(limits: Optional[Mapping[str, float]]) -> Optional[pb.ResourceLimits]:
    """``{"memory_mib": 512, "cpus": 0.5, "io_bps": ..., "io_iops": ..., "pids": ...}``."""
    if not limits:
        return None
    known = {"memory_mib", "cpus", "io_bps", "io_iops", "pids"}
    unknown = set(limits) - known
    if unknown:
        from .errors import InvalidArgument

        raise InvalidArgument(f"unknown limits {sorted(unknown)}; known: {sorted(known)}")
    return pb.ResourceLimits(**{k: (float(v) if k == "cpus" else int(v)) for k, v in limits.items()})


def create_request(
    image: str,
    memory_mib: Optional[int],
    vcpus: Optional[int],
    labels: Optional[Mapping[str, str]],
    template: Optional[str],
    keep_as_template: Optional[str],
    network: Optional[str],
    allow: Optional[Sequence[str]],
    limits: Optional[Mapping[str, float]],
    warm: Optional[str],
) -> pb.CreateRequest:
    req = pb.CreateRequest(
        image=image,
        memory_mib=memory_mib or 0,
        vcpus=vcpus or 0,
        labels=dict(labels or {}),
        from_template=template or "",
        template_name=keep_as_template or "",
        warm=warm or "",
    )
    if network is not None or allow:
        modes = {"none": pb.NETWORK_MODE_NONE, "nat": pb.NETWORK_MODE_NAT}
        if (network or "nat") not in modes:
            from .errors import InvalidArgument

            raise InvalidArgument(f"network must be 'none' or 'nat', not {network!r}")
        req.network.CopyFrom(pb.NetworkPolicy(mode=modes[network or "nat"], allow=list(allow or [])))
    lim = limits_pb(limits)
    if lim is not None:
        req.limits.CopyFrom(lim)
    return req


def exec_request(
    sandbox_id: str,
    args: Args,
    stdin: Optional[Union[bytes, str]],
    env: Optional[Mapping[str, str]],
    cwd: Optional[str],
    timeout: Optional[float],
) -> pb.ExecRequest:
    argv = ["sh", "-c", args] if isinstance(args, str) else list(args)
    req = pb.ExecRequest(
        id=sandbox_id,
        args=argv,
        env=[f"{k}={v}" for k, v in (env or {}).items()],
        cwd=cwd or "",
        timeout_secs=timeout or 0.0,
    )
    if stdin is not None:
        req.stdin = stdin.encode() if isinstance(stdin, str) else stdin
    return req


def write_requests(sandbox_id: str, path: str, data: Union[bytes, str], mode: int) -> Iterator[pb.WriteFileRequest]:
    """The WriteFile stream: id, path and mode ride on the first message only."""
    blob = data.encode() if isinstance(data, str) else bytes(data)
    yield pb.WriteFileRequest(id=sandbox_id, path=path, mode=mode, data=blob[:WRITE_CHUNK])
    for at in range(WRITE_CHUNK, len(blob), WRITE_CHUNK):
        yield pb.WriteFileRequest(data=blob[at : at + WRITE_CHUNK])


class Children(list):
    """The sandboxes a BRANCH made, in creation order, and how long the source paused."""

    pause_ms: float = 0.0
