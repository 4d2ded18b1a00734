"""Who may call the repository API (index, load, unload, route) and how a call reaches the supervisor: the admin
token, written once by the supervisor and read by every worker, and a call handed over the control socket."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
from pathlib import Path


class Admin:
    """What a worker needs for the repository calls: the token they require, and the way to the supervisor."""

    def __init__(self, token: str, path: str | None):
        self.token, self.path = token, path

    def allows(self, authorization) -> bool:
        """`Authorization: Bearer TOKEN` (REST header or gRPC metadata), compared in constant time."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, given = (authorization or "").partition(" ")
        return bool(self.token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), self.token)

    async def call(self, op: str, model: str | None, parameters: dict) -> dict:
        """The supervisor's answer: {"ok": True, "result": ...} or {"ok": False, "status": ..., "error": ...}."""
        if not self.path:
            return {"ok": False, "status": 501, "error": "this server was started without a supervisor"}
        return await forward(self.path, {"op": op, "model": model, "parameters": parameters})


async def forward(path: str, call: dict) -> dict:
    """An admin call (load, unload, route) handed to the supervisor on a connection of its own."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(json.dumps({"admin": call}).encode() + b"\n")
        line = await reader.readline()
    finally:
        writer.close()
    return json.loads(line) if line else {"ok": False, "status": 503, "error": "the supervisor did not answer"}


def read_token(path: str | None) -> str:
    """The admin token the supervisor wrote (it never travels on a command line)."""
    try:
        return Path(path).read_text().strip() if path else ""
    except OSError:
        return ""


def write_token(path: str) -> str:
    """A new admin token in PATH, readable by its owner alone; an existing one is kept (a restart keeps it)."""
    existing = read_token(path)
    if existing:
        return existing
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
