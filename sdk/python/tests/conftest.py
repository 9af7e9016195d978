"""A real forkd daemon for the SDK tests: its own state directory (with the prepared images),
Unix socket and a TCP listener with a token; one `default` sandbox booted per session that the
tests BRANCH from instead of booting their own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import forkd

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def daemon():
    assert os.geteuid() == 0, "the SDK tests boot KVM microVMs through a real daemon and must run as root"
    images = os.environ.get("FORKD_TEST_IMAGES", "/var/lib/forkd/images")
    assert os.path.isdir(os.path.join(images, "default")), f"no default image in {images}; run scripts/setup.sh"
    binary = os.environ.get("FORKD_BIN", os.path.join(REPO, "target", "release", "forkd"))
    state = tempfile.mkdtemp(prefix="forkd-sdk-test-")
    os.symlink(images, os.path.join(state, "images"))
    sock = os.path.join(state, "forkd.sock")
    token = "sdk-test-token-0123456789abcdef"
    token_file = os.path.join(state, "token")
    with open(token_file, "w") as f:
        f.write(token + "\n")
    os.chmod(token_file, 0o600)
    address = f"127.0.0.1:{_free_port()}"
    log = open(os.path.join(state, "daemon.log"), "wb")
    proc = subprocess.Popen(
        [binary, "daemon", "--state-dir", state, "--socket", sock, "--tcp", address, "--token-file", token_file],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = forkd.Client(sock)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.info()
            break
        except forkd.Unavailable:
            assert proc.poll() is None, f"forkd daemon exited: {open(log.name).read()}"
            assert time.monotonic() < deadline, "forkd daemon did not answer within 30 s"
            time.sleep(0.1)
    yield {"socket": sock, "address": address, "token": token, "client": client}
    for sb in client.list():
        forkd.Sandbox(sb.id, client).kill()
    client.close()
    proc.terminate()
    proc.wait(timeout=15)
    log.close()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def client(daemon) -> forkd.Client:
    return daemon["client"]


@pytest.fixture(scope="session")
def base(client):
    """One booted `default` sandbox (Debian + python3) the tests branch from."""
    with forkd.Sandbox.create(image="default", labels={"suite": "sdk"}, client=client) as sb:
        yield sb
