"""The server's listening sockets: for REST and for gRPC the supervisor listens on one socket that every worker accepts
from, so a connection waiting to be accepted outlives any worker (with a socket each, a killed worker's queue was
reset: issue 36; bench/NOTES.md, levers 39, 57 and 65)."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("torchship.oip")
BACKLOG = 2048  # connections the kernel queues for the workers together
ACCEPT_RETRY_S = 1.0  # out of file descriptors: stop accepting for this long, as asyncio does
DEFER_S = 0.005  # how long a worker leaves a waiting connection to a worker with fewer, before it takes it anyway
DEFER_STEP_S = 0.0005
GONE = 1 << 62  # a dead worker's count: nobody defers to it
SHARES = "connections"  # the counts' file, beside the supervisor's saved state


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind(host: str, port: int, what: str) -> socket.socket:
    """SO_REUSEADDR: the connections our last run closed sit in TIME_WAIT on its ports for a minute, and a restart must
    not wait for them."""
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot use {host}:{port} for {what}: {e.strerror}") from None
    return sock


def shared_listener(host: str, port: int, what: str) -> socket.socket:
    """The one listening socket every worker accepts from; inherited by the workers the supervisor starts."""
    sock = bind(host, port, what)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class Shares:
    """Each worker's open connections (REST and gRPC), in a small file every worker maps (the supervisor's work
    folder): what a worker reads before it takes a connection from a shared socket."""

    def __init__(self, path: str | Path, workers: int, index: int = -1):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8 * workers:
                os.ftruncate(fd, 8 * workers)
            self.map = mmap.mmap(fd, 8 * workers)
        finally:
            os.close(fd)
        self.workers, self.index = workers, index
        if index >= 0:
            self.set(0)

    def set(self, n: int, index: int | None = None) -> None:
        struct.pack_into("q", self.map, 8 * (self.index if index is None else index), n)

    def all(self) -> tuple[int, ...]:
        return struct.unpack_from(f"{self.workers}q", self.map)

    def fewer_elsewhere(self, mine: int) -> bool:
        """Another worker holds fewer connections than MINE."""
        return min(self.all()) < mine


class Acceptor:
    """Takes one connection from a listening socket each time it is readable, and hands it to a new protocol. Every
    worker is woken by a new connection. uvloop's own server accepts until the queue is empty, and even one accept a
    wake-up left a burst of 16 keep-alive clients on one worker in 4 of 6 tries (the worker awake first is back for
    the next before the other is scheduled; lever 39 and 57): so a worker that holds more connections than another
    (SHARES) leaves the connection to it, for at most DEFER_S, after which it takes it anyway (the other may be busy
    or dying)."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        shares: Shares | None = None,
        mine: Callable[[], int] = lambda: 0,
    ):
        self.loop, self.sock, self.factory = asyncio.get_running_loop(), sock, factory
        self.shares, self.mine = shares, mine
        self.sock.setblocking(False)
        self.opening: set[asyncio.Task] = set()
        self.serving = False
        self.deferred_at: float | None = None  # when this worker first left the waiting connection to another
        self.start()

    def start(self) -> None:
        if not self.serving:
            self.serving = True
            self.loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self) -> None:
        if self.shares is not None and self.shares.fewer_elsewhere(self.mine()):
            now = time.monotonic()
            self.deferred_at = self.deferred_at or now
            if now - self.deferred_at < DEFER_S:
                self.close()
                self.loop.call_later(DEFER_STEP_S, self.resume)
                return
        self.deferred_at = None
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

    def resume(self) -> None:
        """After leaving a connection to another worker: listen again, and forget the wait if it was taken."""
        if not select.select([self.sock], [], [], 0)[0]:
            self.deferred_at = None
        self.start()

    def close(self) -> None:
        """Accept no more: what waits in the queue is left for the other workers."""
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())
