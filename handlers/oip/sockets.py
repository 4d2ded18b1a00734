"""The server's listening sockets. REST: the supervisor listens on one socket that every worker accepts from, so a
connection waiting to be accepted outlives any worker (with a socket each, a killed worker's queue was reset: issue
36). gRPC: grpcio binds its own sockets, so each worker binds one in the port's SO_REUSEPORT group while the supervisor
holds the port, bound, so that no other server joins it (bench/NOTES.md, levers 39 and 57)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger("torchship.oip")
BACKLOG = 2048  # connections the kernel queues for the workers together
ACCEPT_RETRY_S = 1.0  # out of file descriptors: stop accepting for this long, as asyncio does


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_socket(host: str, *, share: bool) -> socket.socket:
    """SO_REUSEADDR on every socket we bind: the connections our last run closed sit in TIME_WAIT on its ports for a
    minute, and a restart must not wait for them. SHARE: join the port's SO_REUSEPORT group of our workers."""
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def bind(host: str, port: int, what: str, *, share: bool) -> socket.socket:
    sock = tcp_socket(host, share=share)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot use {host}:{port} for {what}: {e.strerror}") from None
    return sock


def hold_port(host: str, port: int, what: str) -> socket.socket:
    """Refuse a port something else holds (SO_REUSEPORT would otherwise quietly join another server's), then keep it
    bound, not listening, for our workers alone: they share it through SO_REUSEPORT."""
    bind(host, port, what, share=False).close()
    return bind(host, port, what, share=True)


def shared_listener(host: str, port: int, what: str) -> socket.socket:
    """The one listening socket every worker accepts from; inherited by the workers the supervisor starts."""
    sock = bind(host, port, what, share=False)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    """A worker's own socket in the port's SO_REUSEPORT group (gRPC's, bound by grpcio the same way)."""
    sock = tcp_socket(host, share=True)
    sock.bind((host, port))
    return sock


class Acceptor:
    """Takes one connection from a listening socket each time it is readable, and hands it to a new protocol. Every
    worker is woken by a new connection; one takes it and the next readiness goes round again, so a burst of new
    connections is spread over the workers (uvloop's own server accepts until the queue is empty, handing a burst to
    whichever worker woke first: lever 39)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]):
        self.loop, self.sock, self.factory = asyncio.get_running_loop(), sock, factory
        self.sock.setblocking(False)
        self.opening: set[asyncio.Task] = set()
        self.serving = False
        self.start()

    def start(self) -> None:
        if not self.serving:
            self.serving = True
            self.loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up while it waited
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS: the connection waits in the queue meanwhile
            logger.warning("accepting a connection failed (%s): pausing %.0f s", e.strerror, ACCEPT_RETRY_S)
            self.close()
            self.loop.call_later(ACCEPT_RETRY_S, self.start)
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
        self.opening.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.opening.discard)

    def close(self) -> None:
        """Accept no more: what waits in the queue is left for the other workers."""
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())
