"""Free TCP ports on loopback, for stacks that must not collide with one already running."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
