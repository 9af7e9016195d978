"""The blocking API: ``Client`` (one connection to the daemon) and ``Sandbox``."""

from __future__ import annotations

import threading
from typing import Callable, List, Mapping, Optional, Sequence, Union, overload

import grpc

from . import types as t
from ._connection import Target, resolve
from .errors import ForkdError, from_rpc_error
from .v1 import forkd_pb2 as pb
from .v1 import forkd_pb2_grpc as rpc

OutputCallback = Callable[[bytes], None]


class Client:
    """A connection to the forkd daemon.

    With no arguments it uses ``FORKD_ADDRESS`` (TCP, with ``FORKD_TOKEN``/``FORKD_TOKEN_FILE``)
    if set, else the Unix socket in ``FORKD_SOCKET``, else /run/forkd/forkd.sock.
    """

    def __init__(self, socket: Optional[str] = None, *, address: Optional[str] = None, token: Optional[str] = None):
        self._target: Target = resolve(socket, address, token)
        self._channel = grpc.insecure_channel(self._target.target, options=self._target.options)
        self.sandboxes = rpc.SandboxesStub(self._channel)
        self.snapshots_rpc = rpc.SnapshotsStub(self._channel)
        self.images_rpc = rpc.ImagesStub(self._channel)
        self.daemon = rpc.DaemonStub(self._channel)

    def call(self, method, request, *, timeout: Optional[float] = None):
        """Calls a unary method, raising the typed forkd exception on failure."""
        try:
            return method(request, metadata=self._target.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.target) from None

    def stream(self, method, request):
        """Iterates a server-streaming method's messages, raising typed exceptions."""
        try:
            yield from method(request, metadata=self._target.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.target) from None

    def list(self) -> List[t.SandboxInfo]:
        """Every sandbox the daemon manages."""
        return [t.SandboxInfo._from_pb(s) for s in self.call(self.sandboxes.List, pb.ListRequest()).sandboxes]

    def list_snapshots(self) -> List[t.SnapshotInfo]:
        resp = self.call(self.snapshots_rpc.List, pb.ListSnapshotsRequest())
        return [t.SnapshotInfo._from_info(s) for s in resp.snapshots]

    def delete_snapshot(self, tag: str, *, cascade: bool = False) -> List[str]:
        """Removes a snapshot (and, with ``cascade``, the diffs built on it); returns the ids."""
        return list(self.call(self.snapshots_rpc.Delete, pb.DeleteSnapshotRequest(tag=tag, cascade=cascade)).removed)

    def images(self) -> List[t.ImageInfo]:
        resp = self.call(self.images_rpc.List, pb.ListImagesRequest())
        return [t.ImageInfo(i.name, i.kind, i.size_bytes, i.sha256) for i in resp.images]

    def info(self) -> pb.InfoResponse:
        """The daemon's version, state directory, pid and limits."""
        return self.call(self.daemon.Info, pb.InfoRequest())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client the ``Sandbox`` class methods use when given none."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


class Files:
    """A sandbox's filesystem: ``sb.files.write/read/list``."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def write(self, path: str, data: Union[bytes, str], *, mode: int = 0o644) -> int:
        """Writes (replaces) a file, creating parent directories; returns the bytes written."""
        c = self._sb.client
        try:
            resp = c.sandboxes.WriteFile(t.write_requests(self._sb.id, path, data, mode), metadata=c._target.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, c._target.target) from None
        return resp.bytes_written

    def read(self, path: str) -> bytes:
        """A file's whole content."""
        c = self._sb.client
        req = pb.ReadFileRequest(id=self._sb.id, path=path)
        return b"".join(chunk.data for chunk in c.stream(c.sandboxes.ReadFile, req))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def list(self, path: str = "/") -> List[t.DirEntry]:
        """A directory's entries."""
        c = self._sb.client
        resp = c.call(c.sandboxes.ListDir, pb.ListDirRequest(id=self._sb.id, path=path))
        return [t.DirEntry(e.name, e.kind, e.size, e.mode, e.mtime_unix) for e in resp.entries]


class Sandbox:
    """A running microVM. Use it as a context manager to kill it on exit::

        with forkd.Sandbox.create(image="default") as sb:
            print(sb.exec(["python3", "-c", "print(6 * 7)"]).text)
    """

    def __init__(self, sandbox_id: str, client: Optional[Client] = None) -> None:
        self.id = sandbox_id
        self.client = client or default_client()
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"

    # -- creating ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        image: str = "default",
        *,
        memory_mib: Optional[int] = None,
        vcpus: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        template: Optional[str] = None,
        keep_as_template: Optional[str] = None,
        network: Optional[str] = None,
        allow: Optional[Sequence[str]] = None,
        limits: Optional[Mapping[str, float]] = None,
        warm: Optional[str] = None,
        client: Optional[Client] = None,
    ) -> "Sandbox":
        """Boots a sandbox from ``image`` (or forks the running ``template``).

        ``network``: "none" (default) or "nat" (default-deny egress; ``allow`` lists "CIDR" or
        "CIDR:PORT" exceptions). ``limits``: memory_mib, cpus, io_bps, io_iops, pids.
        """
        c = client or default_client()
        req = t.create_request(image, memory_mib, vcpus, labels, template, keep_as_template, network, allow, limits, warm)
        return cls(c.call(c.sandboxes.Create, req).id, c)

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Optional[Client] = None) -> "Sandbox":
        """Attaches to an existing sandbox (``NotFound`` if there is none by that id)."""
        sb = cls(sandbox_id, client)
        sb.info()
        return sb

    @overload
    @classmethod
    def from_snapshot(cls, tag: str, *, client: Optional[Client] = None) -> "Sandbox": ...

    @overload
    @classmethod
    def from_snapshot(cls, tag: str, n: int, *, client: Optional[Client] = None) -> List["Sandbox"]: ...

    @classmethod
    def from_snapshot(cls, tag, n=None, *, client=None):
        """Restores a snapshot (by tag or id): one sandbox, or a list of ``n`` (the restored one
        first, then its BRANCH children)."""
        c = client or default_client()
        resp = c.call(c.snapshots_rpc.Restore, pb.RestoreRequest(snapshot_tag=tag, count=n or 1))
        sandboxes = [cls(s.id, c) for s in resp.sandboxes]
        return sandboxes if n is not None else sandboxes[0]

    # -- inspecting ----------------------------------------------------------------------------

    def info(self) -> t.SandboxInfo:
        return t.SandboxInfo._from_pb(self.client.call(self.client.sandboxes.Get, pb.GetRequest(id=self.id)))

    def console(self, max_bytes: int = 64 << 10) -> bytes:
        """The tail of the guest's serial console."""
        req = pb.GetConsoleRequest(id=self.id, max_bytes=max_bytes)
        return self.client.call(self.client.sandboxes.GetConsole, req).data

    # -- running code --------------------------------------------------------------------------

    def exec(
        self,
        args: t.Args,
        *,
        stdin: Optional[Union[bytes, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> t.ExecResult:
        """Runs a command to completion. ``args`` is an argv list, or a string run by ``sh -c``.

        ``on_stdout``/``on_stderr`` receive chunks as they are produced; the result holds all
        of it. A non-zero exit is not an exception: check ``result.exit_code``.
        """
        out = t._Output(on_stdout, on_stderr)
        exit = None
        req = t.exec_request(self.id, args, stdin, env, cwd, timeout)
        for event in self.client.stream(self.client.sandboxes.Exec, req):
            if event.WhichOneof("event") == "exit":
                exit = event.exit
            else:
                out.feed(event)
        return out.exec_result(exit)

    def eval(
        self,
        code: str,
        *,
        context: str = "main",
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> t.EvalResult:
        """Runs Python in a persistent interpreter (``context``): variables, imports and open
        files stay for the next call, and BRANCH children inherit them. A raised exception is
        returned in ``result.error``, not raised."""
        out = t._Output(on_stdout, on_stderr)
        result = None
        req = pb.EvalRequest(id=self.id, code=code, context=context, timeout_secs=timeout or 0.0)
        for event in self.client.stream(self.client.sandboxes.Eval, req):
            if event.WhichOneof("event") == "result":
                result = event.result
            else:
                out.feed(event)
        return out.eval_result(result)

    def contexts(self) -> List[t.ContextInfo]:
        resp = self.client.call(self.client.sandboxes.ListContexts, pb.ListContextsRequest(id=self.id))
        return [t.ContextInfo(c.name, c.lang, c.pid, c.evals, c.version) for c in resp.contexts]

    def close_context(self, name: str) -> None:
        self.client.call(self.client.sandboxes.CloseContext, pb.CloseContextRequest(id=self.id, name=name))

    # -- forking and saving --------------------------------------------------------------------

    def branch(self, n: int = 1, *, limits: Optional[Mapping[str, float]] = None) -> t.Children:
        """Forks this running sandbox into ``n`` children that continue from its memory, disk
        and processes; this one keeps running. ``.pause_ms`` says how long it was paused."""
        req = pb.BranchRequest(id=self.id, count=n)
        lim = t.limits_pb(limits)
        if lim is not None:
            req.limits.CopyFrom(lim)
        resp = self.client.call(self.client.sandboxes.Branch, req)
        kids = t.Children(Sandbox(s.id, self.client) for s in resp.children)
        kids.pause_ms = resp.pause_ms
        return kids

    def snapshot(self, tag: Optional[str] = None, *, diff: bool = False, wait: bool = True) -> t.SnapshotInfo:
        """Saves this sandbox durably (it keeps running); restore with ``Sandbox.from_snapshot``.
        ``diff`` stores only pages changed since its last snapshot."""
        req = pb.CreateSnapshotRequest(id=self.id, tag=tag or "", diff=diff, wait=wait)
        return t.SnapshotInfo._from_result(self.client.call(self.client.snapshots_rpc.Create, req))

    # -- ending --------------------------------------------------------------------------------

    def kill(self) -> None:
        """Stops the sandbox and removes it. Killing one that is already gone is not an error."""
        try:
            self.client.call(self.client.sandboxes.Delete, pb.DeleteRequest(id=self.id))
        except ForkdError as e:
            if e.code != "not_found":
                raise

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
