"""Whether a connection is read, and how many a worker has stopped reading: uvicorn's flow control
(`protocols/http/flow_control.py`) for http11.Connection. Reading pauses while a client leaves its answers unread (the
transport calls pause_writing once its write buffer passes Limits.unsent_bytes) or too many of its requests wait
behind the one being answered, and resumes when they go out."""

from __future__ import annotations

from collections.abc import Callable


class Tally:
    """A worker's connections: how many are open, and how many it has stopped reading (flow control); `watch` hears
    every change (the metrics' gauges)."""

    def __init__(self, watch: Callable[[int, int], None] | None = None):
        self.open = self.paused = 0
        self.watch = watch or (lambda open_, paused: None)

    def add(self, open_: int = 0, paused: int = 0) -> None:
        self.open += open_
        self.paused += paused
        self.watch(self.open, self.paused)


class FlowControl:
    """One connection's reading and writing state, counted in the worker's tally while flow control holds it."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.transport = None  # set while the connection is open
        self.reading = True
        self.writing_paused = False  # the transport's write buffer is past its high mark
        self.paused = False  # counted in the tally as stopped by flow control

    def read(self, on: bool, *, refused: bool) -> None:
        """Read the connection or stop reading it; a refused connection stops for good, which is no pause."""
        transport = self.transport
        if on != self.reading and transport is not None and not transport.is_closing():
            self.reading = on
            (transport.resume_reading if on else transport.pause_reading)()
        self.count(not self.reading and not refused)

    def count(self, paused: bool) -> None:
        """Whether flow control has stopped reading this connection, as the tally counts it."""
        if paused != self.paused:
            self.paused = paused
            self.tally.add(paused=1 if paused else -1)
