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
import struct
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

RECORD = struct.Struct("<qdd")  # a busy pass: its worker's pid, when it ended and how long it took (monotonic seconds)


class Slots:
    """COUNT slots as lock files beside PREFIX; a pass waits for a free one. Zero: passes never wait."""

    def __init__(self, prefix: str | Path, count: int, *, clock: Callable[[], float] = time.monotonic, owner: int = 0):
        self.count = count
        self.fds = [os.open(f"{prefix}-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600) for i in range(count)]
        # held shared by a worker waiting for a slot: a pass runs wide only when nobody waits, since flock's wake-ups
        # are not fair (a worker that loops straight back would otherwise take every slot again before the waiter runs)
        self.waiting = os.open(f"{prefix}-waiting.lock", os.O_RDWR | os.O_CREAT, 0o600) if count else -1
        # a record a slot of the last busy pass run on it beside another (owner, end, duration): between two passes a
        # loaded worker holds no slot, and the other would otherwise go wide and leave it waiting out a whole wide pass
        self.records = os.open(f"{prefix}-busy", os.O_RDWR | os.O_CREAT, 0o600) if count else -1
        self.clock, self.owner = clock, owner or os.getpid()  # CLOCK_MONOTONIC: one clock for every process
        self.turn = self.owner  # where a worker that finds every slot taken waits: spread over the slots
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

        def adapting(*args):
            with self.taken(wide=not self._others_busy()) as held:
                if held == self.count:
                    return fn(*args)
                start = self.clock()
                try:
                    return busy(*args)
                finally:
                    if self.beside:  # a pass beside another's, not one kept busy by the record alone
                        end = self.clock()
                        os.pwrite(self.records, RECORD.pack(self.owner, end, end - start), self.slot * RECORD.size)

        return adapting

    def take(self, wide: bool = False) -> list[int]:
        self.local.acquire()
        held = []
        for fd in self.fds:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
            except BlockingIOError:
                pass
        self.beside = len(held) < self.count or not self._nobody_waits()  # another pass runs, or waits to
        if wide and not self.beside:
            return held
        for fd in held[1:]:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if held:
            return self._one(held[0])
        fcntl.flock(self.waiting, fcntl.LOCK_SH)  # every slot taken: wait for one, seen waiting
        fd = self.fds[self.turn % self.count]
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(self.waiting, fcntl.LOCK_UN)
        return self._one(fd)

    def _one(self, fd: int) -> list[int]:
        self.slot = self.fds.index(fd)
        return [fd]

    def _others_busy(self) -> bool:
        """Another worker ran a pass beside another's within that pass's time: the load goes on."""
        data, now = os.pread(self.records, RECORD.size * self.count, 0), self.clock()
        for i in range(len(data) // RECORD.size):
            owner, end, took = RECORD.unpack_from(data, i * RECORD.size)
            if owner != self.owner and now - end <= took:
                return True
        return False

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
        for fd in [*self.fds, self.waiting, self.records] if self.fds else ():
            os.close(fd)
        self.fds = []


NONE = Slots("", 0)
