"""A free TCP port on loopback: the rendezvous of a learner process group, or a test server.

The OS picks the port (bind to 0); it is released before the caller binds it, so another
process could take it in between. Good enough for one machine's rendezvous; servers that
must not race bind port 0 themselves.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
