"""Forward passes at once over all of a server's workers. A heavy model runs fastest with every core in one pass, and
answers a lone request fastest that way too; two workers each given every core fight over them when both run (12 %
fewer ResNet-50 images a second here). So a heavy model's worker takes the server's pass slots first (bench/NOTES.md,
levers 59 and 64): a slot a core, and a pass that finds every slot free holds them all and runs on every core (wide);
one that finds a pass running holds one and runs on one core (busy), so that under load the workers split the cores
instead of queueing for all of them. Without a busy call, each pass holds one slot: the workers take turns. A slot is an
flock on a file in the supervisor's work folder: the kernel frees a dead worker's."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


class Slots:
    """COUNT slots as lock files beside PREFIX; a pass waits for a free one. Zero: passes never wait."""

    def __init__(self, prefix: str | Path, count: int):
        self.count = count
        self.fds = [os.open(f"{prefix}-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(count)]
        # held shared by a worker waiting for a slot: a pass runs wide only when nobody waits, since flock's wake-ups
        # are not fair (a worker that loops straight back would otherwise take every slot again before the waiter runs)
        self.waiting = os.open(f"{prefix}-waiting.lock", os.O_RDWR | os.O_CREAT, 0o600) if count else -1
        self.turn = os.getpid()  # where a worker that finds every slot taken waits: spread over the slots
        self.local = threading.Lock()  # an flock is the process's: its own threads' passes queue here first

    @contextmanager
    def taken(self, wide: bool = False):
        """Holding one slot, or every slot where WIDE and all are free with nobody waiting; yields the held count."""
        if not self.fds:
            yield 0
            return
        held = self.take(wide)
        try:
            yield len(held)
        finally:
            self.give(held)

    def around(self, fn: Callable, busy: Callable | None = None) -> Callable:
        """FN with each call in a slot; FN itself where there are no slots, so a fast model's pass pays nothing.
        BUSY: the model on fewer threads, run by a pass that holds fewer than every slot (FN by one holding all)."""
        if not self.fds:
            return fn
        if busy is None:

            def in_slot(*args):
                with self.taken():
                    return fn(*args)

            return in_slot
        last = [0.0, 0.0]  # when this worker's last busy pass ended, and how long it took

        def adapting(*args):
            # under load, a worker between two passes leaves every slot free for a moment: one that ran busy within a
            # pass's time stays busy, or the other worker would wait out a whole wide pass (bench/NOTES.md, lever 64)
            with self.taken(wide=time.monotonic() - last[0] > last[1]) as held:
                if held == self.count:
                    return fn(*args)
                start = time.monotonic()
                try:
                    return busy(*args)
                finally:
                    last[:] = time.monotonic(), time.monotonic() - start

        return adapting

    def take(self, wide: bool = False) -> list[int]:
        self.local.acquire()
        held = []
        for fd in self.fds if wide else ():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
            except BlockingIOError:
                pass
        if len(held) == self.count and self._nobody_waits():
            return held
        for fd in held[1:]:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if held:
            return held[:1]
        for fd in self.fds:  # a free one at once
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return [fd]
            except BlockingIOError:
                continue
        fcntl.flock(self.waiting, fcntl.LOCK_SH)  # else wait for one, seen waiting
        fd = self.fds[self.turn % self.count]
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(self.waiting, fcntl.LOCK_UN)
        return [fd]

    def give(self, held: list[int]) -> None:
        for fd in held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.local.release()

    def _nobody_waits(self) -> bool:
        try:
            fcntl.flock(self.waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.waiting, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        for fd in [*self.fds, self.waiting] if self.fds else ():
            os.close(fd)
        self.fds = []


NONE = Slots("", 0)
