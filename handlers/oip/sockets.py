"""The server's listening sockets: the supervisor holds each port so that no other server takes it, and every worker
binds its own socket to it in the port's SO_REUSEPORT group, so the kernel spreads connections over the workers
(bench/NOTES.md, lever 39)."""

from __future__ import annotations

import socket


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


def hold_port(host: str, port: int, what: str) -> socket.socket:
    """Refuse a port something else holds (SO_REUSEPORT would otherwise quietly join another server's), then keep it
    bound, not listening, for our workers alone: they share it through SO_REUSEPORT."""
    probe = tcp_socket(host, share=False)
    try:
        probe.bind((host, port))
    except OSError as e:
        raise SystemExit(f"cannot use {host}:{port} for {what}: {e.strerror}") from None
    finally:
        probe.close()
    guard = tcp_socket(host, share=True)
    guard.bind((host, port))
    return guard


def listening_socket(host: str, port: int) -> socket.socket:
    """A worker's own REST socket in the port's SO_REUSEPORT group; it listens once the server starts on it."""
    sock = tcp_socket(host, share=True)
    sock.bind((host, port))
    return sock
