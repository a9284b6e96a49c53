"""Running several uvicorn workers with one listening socket *each*.

uvicorn's own multi-worker mode binds one socket in the parent and shares it: all workers
then race to ``accept()`` on one queue, and the first to wake takes a whole burst of new
connections. Measured here: 64 keep-alive connections split 46/18 between two workers, so
one worker served 72% of the load and set the p99. With ``SO_REUSEPORT`` each worker
listens on its own socket in one group, and the kernel spreads new connections across
them by a hash of the client address and port (Linux).

uvicorn's supervisor (restarts, signals, health pings) is kept: it hands every worker it
starts the same list of "sockets", and :class:`ReusePortListener` is a stand-in that
becomes a fresh ``SO_REUSEPORT`` socket when the worker unpickles it.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

#: Whether this platform balances connections across SO_REUSEPORT sockets.
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` in the port's SO_REUSEPORT group."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortListener:
    """Pickles as "bind a new SO_REUSEPORT socket to this address": each worker that
    receives it gets a listening socket of its own."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


def run_workers(config: uvicorn.Config) -> None:
    """Run ``config.workers`` workers under uvicorn's supervisor, each on its own socket.

    The parent binds the address too (without listening) so that a port held by another
    program fails here, at once, and so that the port stays this group's while workers
    restart. Needs a fixed TCP port: port 0 would give every worker a port of its own.
    """
    if not SUPPORTED or config.uds or config.fd is not None or config.port == 0:
        raise ValueError("per-worker sockets need Linux and a fixed TCP host and port")
    with reuse_port_socket(config.host, config.port):
        Multiprocess(config, sockets=[ReusePortListener(config.host, config.port)]).run()  # type: ignore[list-item]
