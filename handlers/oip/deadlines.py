"""The client's deadlines on one connection (nginx's timeouts: client_header_timeout, client_body_timeout,
keepalive_timeout, send_timeout), on one timer moved lazily: a body's clock restarts on every read, and a later
deadline needs no new timer, so a busy connection costs no timer churn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

IDLE, HEAD, BODY, SEND = "idle", "head", "body", "send"  # which of the client's deadlines runs
RECHECK_S = 1.0  # a deadline passed while the server itself held things up is looked at again this much later


class Deadline:
    """The one deadline that runs (its KIND and when it falls due); at its time EXPIRED(kind, now) acts on it, or
    answers False when the client is not at fault, and the deadline is looked at again later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[str, float], bool]):
        self.loop, self.expired = loop, expired
        self.kind, self.due = IDLE, 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = float("inf")

    def start(self, kind: str, seconds: float, keep: bool = False) -> None:
        """Start KIND's clock (keep: the one already running for KIND goes on)."""
        if keep and self.kind == kind:
            return
        self.kind, self.due = kind, self.loop.time() + seconds
        self._arm(self.due)

    def extend(self, seconds: float) -> None:
        """The running clock starts again from now; the timer already set fires first and finds it not due."""
        self.due = self.loop.time() + seconds

    def cancel(self) -> None:
        if self.timer:
            self.timer.cancel()
        self.timer, self.timer_at = None, float("inf")

    def _arm(self, at: float) -> None:
        if at < self.timer_at:
            if self.timer:
                self.timer.cancel()
            self.timer_at = at
            self.timer = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self.timer, self.timer_at = None, float("inf")
        now = self.loop.time()
        if self.due > now or not self.expired(self.kind, now):  # not due yet, or not the client's doing
            self._arm(max(self.due, now + RECHECK_S))
