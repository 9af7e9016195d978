"""The asyncio twin of the blocking API: the same names and results, awaited::

    import forkd.aio

    sb = await forkd.aio.Sandbox.create(image="default")
    async with sb:
        print((await sb.exec("echo hi")).text)
        kids = await sb.branch(4)
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Union

import grpc
import grpc.aio

from . import types as t
from ._connection import Target, resolve
from .errors import ForkdError, from_rpc_error
from .v1 import forkd_pb2 as pb
from .v1 import forkd_pb2_grpc as rpc

OutputCallback = Callable[[bytes], None]

__all__ = ["Client", "Sandbox", "Files"]


class Client:
    """An asyncio connection to the daemon (same address rules as ``forkd.Client``)."""

    def __init__(self, socket: Optional[str] = None, *, address: Optional[str] = None, token: Optional[str] = None):
        self._target: Target = resolve(socket, address, token)
        self._channel = grpc.aio.insecure_channel(self._target.target, options=self._target.options)
        self.sandboxes = rpc.SandboxesStub(self._channel)
        self.snapshots_rpc = rpc.SnapshotsStub(self._channel)
        self.images_rpc = rpc.ImagesStub(self._channel)
        self.daemon = rpc.DaemonStub(self._channel)

    async def call(self, method, request, *, timeout: Optional[float] = None):
        try:
            return await method(request, metadata=self._target.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.target) from None

    async def stream(self, method, request):
        try:
            async for message in method(request, metadata=self._target.metadata):
                yield message
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target.target) from None

    async def list(self) -> List[t.SandboxInfo]:
        resp = await self.call(self.sandboxes.List, pb.ListRequest())
        return [t.SandboxInfo._from_pb(s) for s in resp.sandboxes]

    async def list_snapshots(self) -> List[t.SnapshotInfo]:
        resp = await self.call(self.snapshots_rpc.List, pb.ListSnapshotsRequest())
        return [t.SnapshotInfo._from_info(s) for s in resp.snapshots]

    async def images(self) -> List[t.ImageInfo]:
        resp = await self.call(self.images_rpc.List, pb.ListImagesRequest())
        return [t.ImageInfo(i.name, i.kind, i.size_bytes, i.sha256) for i in resp.images]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Files:
    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    async def write(self, path: str, data: Union[bytes, str], *, mode: int = 0o644) -> int:
        c = self._sb.client
        try:
            resp = await c.sandboxes.WriteFile(
                t.write_requests(self._sb.id, path, data, mode), metadata=c._target.metadata
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e, c._target.target) from None
        return resp.bytes_written

    async def read(self, path: str) -> bytes:
        c = self._sb.client
        chunks = [m.data async for m in c.stream(c.sandboxes.ReadFile, pb.ReadFileRequest(id=self._sb.id, path=path))]
        return b"".join(chunks)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def list(self, path: str = "/") -> List[t.DirEntry]:
        c = self._sb.client
        resp = await c.call(c.sandboxes.ListDir, pb.ListDirRequest(id=self._sb.id, path=path))
        return [t.DirEntry(e.name, e.kind, e.size, e.mode, e.mtime_unix) for e in resp.entries]


class Sandbox:
    """A running microVM; every method is a coroutine. See ``forkd.Sandbox`` for the details."""

    def __init__(self, sandbox_id: str, client: Client) -> None:
        self.id = sandbox_id
        self.client = client
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"aio.Sandbox({self.id!r})"

    @classmethod
    async def create(
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
        c = client or Client()
        req = t.create_request(image, memory_mib, vcpus, labels, template, keep_as_template, network, allow, limits, warm)
        return cls((await c.call(c.sandboxes.Create, req)).id, c)

    @classmethod
    async def connect(cls, sandbox_id: str, *, client: Optional[Client] = None) -> "Sandbox":
        sb = cls(sandbox_id, client or Client())
        await sb.info()
        return sb

    @classmethod
    async def from_snapshot(cls, tag: str, n: Optional[int] = None, *, client: Optional[Client] = None):
        c = client or Client()
        resp = await c.call(c.snapshots_rpc.Restore, pb.RestoreRequest(snapshot_tag=tag, count=n or 1))
        sandboxes = [cls(s.id, c) for s in resp.sandboxes]
        return sandboxes if n is not None else sandboxes[0]

    async def info(self) -> t.SandboxInfo:
        return t.SandboxInfo._from_pb(await self.client.call(self.client.sandboxes.Get, pb.GetRequest(id=self.id)))

    async def exec(
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
        out = t._Output(on_stdout, on_stderr)
        exit = None
        req = t.exec_request(self.id, args, stdin, env, cwd, timeout)
        async for event in self.client.stream(self.client.sandboxes.Exec, req):
            if event.WhichOneof("event") == "exit":
                exit = event.exit
            else:
                out.feed(event)
        return out.exec_result(exit)

    async def eval(
        self,
        code: str,
        *,
        context: str = "main",
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
    ) -> t.EvalResult:
        out = t._Output(on_stdout, on_stderr)
        result = None
        req = pb.EvalRequest(id=self.id, code=code, context=context, timeout_secs=timeout or 0.0)
        async for event in self.client.stream(self.client.sandboxes.Eval, req):
            if event.WhichOneof("event") == "result":
                result = event.result
            else:
                out.feed(event)
        return out.eval_result(result)

    async def branch(self, n: int = 1, *, limits: Optional[Mapping[str, float]] = None) -> t.Children:
        req = pb.BranchRequest(id=self.id, count=n)
        lim = t.limits_pb(limits)
        if lim is not None:
            req.limits.CopyFrom(lim)
        resp = await self.client.call(self.client.sandboxes.Branch, req)
        kids = t.Children(Sandbox(s.id, self.client) for s in resp.children)
        kids.pause_ms = resp.pause_ms
        return kids

    async def snapshot(self, tag: Optional[str] = None, *, diff: bool = False, wait: bool = True) -> t.SnapshotInfo:
        req = pb.CreateSnapshotRequest(id=self.id, tag=tag or "", diff=diff, wait=wait)
        return t.SnapshotInfo._from_result(await self.client.call(self.client.snapshots_rpc.Create, req))

    async def kill(self) -> None:
        try:
            await self.client.call(self.client.sandboxes.Delete, pb.DeleteRequest(id=self.id))
        except ForkdError as e:
            if e.code != "not_found":
                raise

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.kill()
