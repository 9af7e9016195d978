"""The Python SDK against a real daemon and real microVMs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

import forkd
import forkd.aio
from forkd.v1 import forkd_pb2, forkd_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))


def test_stock_grpcio_works_on_the_unix_socket_without_options(daemon):
    # grpcio sends the socket path as :authority; the daemon must accept it as is.
    with grpc.insecure_channel(f"unix://{daemon['socket']}") as channel:
        info = forkd_pb2_grpc.DaemonStub(channel).Info(forkd_pb2.InfoRequest(), timeout=10)
        listed = forkd_pb2_grpc.SandboxesStub(channel).List(forkd_pb2.ListRequest(), timeout=10)
    assert info.backend and info.version
    assert isinstance(list(listed.sandboxes), list)


def test_exec_returns_output_and_exit_code_and_streams(base):
    chunks = []
    r = base.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], on_stdout=chunks.append)
    assert (r.stdout, r.stderr, r.exit_code, r.ok) == (b"out\n", b"err\n", 3, False)
    assert b"".join(chunks) == b"out\n"
    r = base.exec("cat; echo $GREETING; pwd", stdin="piped\n", env={"GREETING": "hi"}, cwd="/tmp")
    assert r.text == "piped\nhi\n/tmp\n"
    r = base.exec(["python3", "-c", "print(6 * 7)"])
    assert r.text == "42\n"
    r = base.exec("sleep 5", timeout=0.5)
    assert r.timed_out and r.exit_code == 124


def test_files_write_read_list(base):
    blob = os.urandom(3 << 20)  # several WriteFile messages
    assert base.files.write("/tmp/sdk/blob.bin", blob) == len(blob)
    assert base.files.read("/tmp/sdk/blob.bin") == blob
    base.files.write("/tmp/sdk/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert base.exec(["/tmp/sdk/run.sh"]).text == "ran\n"
    entries = {e.name: e for e in base.files.list("/tmp/sdk")}
    assert entries["blob.bin"].size == len(blob) and entries["blob.bin"].kind == "file"
    assert entries["run.sh"].mode & 0o777 == 0o755
    with pytest.raises(forkd.NotFound):
        base.files.read("/tmp/sdk/missing")


def test_eval_keeps_state_and_reports_errors(base):
    first = base.eval("counter = 41", context="sdk")
    assert first.error is None
    second = base.eval("print('side'); counter + 1", context="sdk")
    assert second.value == "42" and second.json == "42" and second.text == "side\n"
    bad = base.eval("1 / 0", context="sdk")
    assert bad.error is not None and bad.error.name == "ZeroDivisionError"
    assert any(c.name == "sdk" for c in base.contexts())


def test_branch_children_inherit_and_diverge(base):
    base.eval("inherited = 'from the source'", context="branch")
    base.files.write("/root/marker", "source")
    kids = base.branch(2)
    assert len(kids) == 2 and kids.pause_ms > 0
    try:
        for i, kid in enumerate(kids):
            assert kid.info().parent == base.id
            assert kid.eval("inherited", context="branch").value == "'from the source'"
            kid.files.write("/root/marker", f"child {i}")
        assert [k.files.read_text("/root/marker") for k in kids] == ["child 0", "child 1"]
        assert base.files.read_text("/root/marker") == "source"
    finally:
        for kid in kids:
            kid.kill()
    with pytest.raises(forkd.NotFound):
        kids[0].info()


def test_snapshot_and_restore(base, client):
    base.files.write("/root/snap.txt", "saved")
    snap = base.snapshot(tag="sdk-snap")
    assert snap.durable and snap.kind == "full" and snap.source == base.id
    assert any(s.tag == "sdk-snap" for s in client.list_snapshots())
    one = forkd.Sandbox.from_snapshot("sdk-snap", client=client)
    many = forkd.Sandbox.from_snapshot("sdk-snap", 2, client=client)
    try:
        assert isinstance(one, forkd.Sandbox) and len(many) == 2
        for sb in [one, *many]:
            assert sb.files.read_text("/root/snap.txt") == "saved"
        assert one.info().restored_from
    finally:
        for sb in [one, *many]:
            sb.kill()
    assert client.delete_snapshot("sdk-snap")


def test_errors_are_typed(base, client):
    assert forkd.Sandbox.connect(base.id, client=client).id == base.id
    with pytest.raises(forkd.NotFound):
        forkd.Sandbox.connect("sb-000000000000", client=client)
    with pytest.raises(forkd.NotFound):
        forkd.Sandbox("sb-000000000000", client).exec("true")
    with pytest.raises(forkd.InvalidArgument):
        base.exec([])
    with pytest.raises(forkd.InvalidArgument, match="no image named"):
        forkd.Sandbox.create(image="no-such-image", client=client)
    with pytest.raises(forkd.InvalidArgument):
        base.branch(limits={"bogus": 1})
    with pytest.raises(forkd.Unavailable, match="forkd daemon"):
        forkd.Client("/nonexistent/forkd.sock").info()


def test_tcp_with_a_token(daemon, base):
    with forkd.Client(address=daemon["address"], token=daemon["token"]) as tcp:
        assert forkd.Sandbox.connect(base.id, client=tcp).exec("echo tcp").text == "tcp\n"
    with forkd.Client(address=daemon["address"], token="wrong-token-wrong-token") as bad:
        with pytest.raises(forkd.Unauthenticated):
            bad.list()


def test_asyncio_twin(daemon, base):
    async def main():
        async with forkd.aio.Client(daemon["socket"]) as c:
            sb = await forkd.aio.Sandbox.connect(base.id, client=c)
            assert (await sb.exec(["echo", "async"])).text == "async\n"
            assert (await sb.eval("2 ** 10", context="aio")).value == "1024"
            await sb.files.write("/tmp/aio.txt", b"async bytes")
            assert await sb.files.read("/tmp/aio.txt") == b"async bytes"
            assert any(e.name == "aio.txt" for e in await sb.files.list("/tmp"))
            kids = await sb.branch(1)
            async with kids[0] as kid:
                assert (await kid.exec("cat /tmp/aio.txt")).text == "async bytes"
            with pytest.raises(forkd.NotFound):
                await forkd.aio.Sandbox.connect("sb-000000000000", client=c)

    asyncio.run(main())


def test_fanout_example_runs(daemon, base):
    env = dict(os.environ, FORKD_SOCKET=daemon["socket"], FORKD_EXAMPLE_TEMPLATE=base.id)
    example = os.path.join(HERE, "..", "..", "..", "examples", "fanout.py")
    out = subprocess.run([sys.executable, example], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "winner:" in out.stdout
