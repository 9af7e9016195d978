"""forkd-mcp driven by the official MCP Python client (the `mcp` package from PyPI), over stdio
and over streamable HTTP with a bearer token. forkd-mcp runs embedded (no daemon): it owns a
controller on a fresh state directory holding the prepared images."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("FORKD_MCP_BIN", os.path.join(REPO, "target", "release", "forkd-mcp"))
TOOLS = {
    "create_sandbox", "list_sandboxes", "get_sandbox", "kill_sandbox", "exec_command", "eval_code",
    "read_file", "write_file", "list_dir", "branch_sandbox", "create_snapshot", "list_snapshots",
    "restore_snapshot", "wait_for_text", "ping_sandbox", "list_images",
}


@pytest.fixture
def state_dir():
    assert os.geteuid() == 0, "the MCP tests boot KVM microVMs and must run as root"
    images = os.environ.get("FORKD_TEST_IMAGES", "/var/lib/forkd/images")
    assert os.path.isdir(os.path.join(images, "default")), f"no default image in {images}; run scripts/setup.sh"
    state = tempfile.mkdtemp(prefix="forkd-mcp-test-")
    os.symlink(images, os.path.join(state, "images"))
    yield state
    shutil.rmtree(state, ignore_errors=True)


def server_env(state: str) -> dict:
    # No FORKD_SOCKET: no daemon serves this state directory, so the server runs sandboxes itself.
    env = {k: v for k, v in os.environ.items() if k.startswith("FORKD_") and k != "FORKD_SOCKET"}
    env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), FORKD_STATE_DIR=state)
    return env


async def call(session: ClientSession, tool: str, **args) -> dict:
    result = await session.call_tool(tool, args)
    assert not result.is_error, f"{tool} failed: {result.content}"
    return result.structured_content


async def exercise(session: ClientSession) -> None:
    """The walk both transports must pass: tools, create, exec, files, branch, exec in a child,
    errors, kill."""
    init = await session.initialize()
    assert init.server_info.name == "forkd-mcp"
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert TOOLS <= set(tools), f"missing tools: {TOOLS - set(tools)}"
    assert tools["exec_command"].description and tools["exec_command"].input_schema["properties"]["command"]

    created = await call(session, "create_sandbox", image="default")
    sb = created["ids"][0]
    resources = await session.list_resources()
    assert any(sb in str(r.uri) for r in resources.resources), "created sandboxes are listed as resources"

    out = await call(session, "exec_command", id=sb, command=["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    assert (out["stdout"], out["stderr"], out["exit_code"]) == ("hello\n", "oops\n", 3)
    big = await call(session, "exec_command", id=sb, command=["sh", "-c", "yes x | head -c 100000"], max_output_bytes=1000)
    assert big["truncated"] and "cut by forkd-mcp" in big["stdout"] and len(big["stdout"]) < 2000

    await call(session, "write_file", id=sb, path="/root/notes.txt", content="from mcp\n")
    read = await call(session, "read_file", id=sb, path="/root/notes.txt")
    assert read["content"] == "from mcp\n"
    listed = await call(session, "list_dir", id=sb, path="/root")
    assert any(e["name"] == "notes.txt" for e in listed["entries"])
    evaluated = await call(session, "eval_code", id=sb, code="x = 20\nx * 2 + 2")
    assert evaluated["value"] == "42"

    branched = await call(session, "branch_sandbox", id=sb, count=2)
    kids = branched["children"]
    assert len(kids) == 2 and branched["pause_ms"] > 0
    await call(session, "write_file", id=kids[0], path="/root/notes.txt", content="child 0\n")
    in_kid = await call(session, "exec_command", id=kids[0], command=["cat", "/root/notes.txt"])
    assert in_kid["stdout"] == "child 0\n"
    in_kid = await call(session, "exec_command", id=kids[1], command=["cat", "/root/notes.txt"])
    assert in_kid["stdout"] == "from mcp\n"
    assert (await call(session, "eval_code", id=kids[1], code="x"))["value"] == "20"
    assert (await call(session, "ping_sandbox", id=kids[1]))["state"]

    waited = await call(session, "wait_for_text", id=sb, text="ready", command=["sh", "-c", "sleep 0.2; echo ready"])
    assert waited["found"]

    bad = await session.call_tool("exec_command", {"id": "sb-000000000000", "command": ["true"]})
    assert bad.is_error and bad.structured_content["error"]["code"] == "not_found"
    assert "sb-000000000000" in bad.content[0].text
    bad = await session.call_tool("exec_command", {"id": sb, "command": []})
    assert bad.is_error

    listed = await call(session, "list_sandboxes")
    assert {sb, *kids} <= {s["id"] for s in listed["sandboxes"]}
    removed = await call(session, "kill_sandbox", ids=[sb, *kids])
    assert sorted(removed["removed"]) == sorted([sb, *kids])
    assert (await call(session, "list_sandboxes"))["sandboxes"] == []


def test_stdio_with_the_official_client(state_dir):
    async def main():
        params = StdioServerParameters(command=BINARY, args=[], env=server_env(state_dir))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await exercise(session)

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(state: str, token: str):
    token_file = os.path.join(state, "token")
    with open(token_file, "w") as f:
        f.write(token + "\n")
    os.chmod(token_file, 0o600)
    addr = f"127.0.0.1:{_free_port()}"
    log = open(os.path.join(state, "mcp.log"), "wb")
    proc = subprocess.Popen(
        [BINARY, "--http", addr, "--token-file", token_file, "--cleanup"],
        env=server_env(state),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{addr}/mcp"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(tuple(addr.split(":")[:1]) + (int(addr.split(":")[1]),), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, open(log.name).read()
                assert time.monotonic() < deadline, "forkd-mcp --http did not listen within 30 s"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_streamable_http_with_a_token(state_dir):
    token = "mcp-test-token-0123456789abcdef"
    with http_server(state_dir, token) as url:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401

        async def main():
            headers = {"Authorization": f"Bearer {token}"}
            timeout = httpx2.Timeout(30, read=300)
            async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
                async with streamable_http_client(url, http_client=http) as (read, write):
                    async with ClientSession(read, write) as session:
                        await exercise(session)

        asyncio.run(main())
