"""Forward passes at once over all of a server's workers. A heavy model runs fastest with every core in one pass, and
answers a lone request fastest that way too; two workers each given every core fight over them when both run (12 %
fewer ResNet-50 images a second here). So each worker keeps every core for its passes and takes one of the
server's pass slots first (bench/NOTES.md, lever 59): passes queue across workers as they would in one, and a dead
worker still leaves one that serves. A slot is an flock on a file in the supervisor's work folder: the kernel frees
a dead worker's."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


class Slots:
    """COUNT slots as lock files beside PREFIX; a pass waits for a free one. Zero: passes never wait."""

    def __init__(self, prefix: str | Path, count: int):
        self.count = count
        self.fds = [os.open(f"{prefix}-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(count)]
        self.turn = os.getpid()  # where a worker that finds every slot taken waits: spread over the slots

    @contextmanager
    def taken(self):
        if not self.fds:
            yield
            return
        fd = self._take()
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def around(self, fn: Callable) -> Callable:
        """FN with each call in a slot; FN itself where there are no slots, so a fast model's pass pays nothing."""
        if not self.fds:
            return fn

        def in_slot(*args):
            with self.taken():
                return fn(*args)

        return in_slot

    def _take(self) -> int:
        for fd in self.fds:  # a free one at once
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                continue
        fd = self.fds[self.turn % self.count]  # else wait for one
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


NONE = Slots("", 0)
