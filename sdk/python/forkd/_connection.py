"""Where the daemon is: its Unix socket (default) or a TCP address with a bearer token."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

DEFAULT_SOCKET = "/run/forkd/forkd.sock"
#: Bigger than the daemon's 16 MiB message limit, so a full-size file chunk always fits.
_MAX_MESSAGE = 32 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
]


@dataclass(frozen=True)
class Target:
    """A resolved daemon address: the gRPC target string and the call metadata it needs."""

    target: str
    metadata: Tuple[Tuple[str, str], ...]

    @property
    def options(self) -> List[Tuple[str, int]]:
        return list(CHANNEL_OPTIONS)


def resolve(socket: Optional[str] = None, address: Optional[str] = None, token: Optional[str] = None) -> Target:
    """Explicit arguments first, then ``FORKD_ADDRESS`` (+ ``FORKD_TOKEN`` or
    ``FORKD_TOKEN_FILE``), then ``FORKD_SOCKET``, then /run/forkd/forkd.sock."""
    if socket is None and address is None:
        address = os.environ.get("FORKD_ADDRESS") or None
        socket = os.environ.get("FORKD_SOCKET") or None
    if address is not None:
        if token is None:
            token = os.environ.get("FORKD_TOKEN")
        if token is None and os.environ.get("FORKD_TOKEN_FILE"):
            with open(os.environ["FORKD_TOKEN_FILE"], encoding="utf-8") as f:
                token = f.read().strip()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return Target(address, metadata)
    path = os.path.abspath(socket or DEFAULT_SOCKET)
    # A stock grpcio target: the daemon accepts the socket path grpcio sends as :authority.
    return Target(f"unix://{path}", ())
