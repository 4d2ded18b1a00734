"""Triton's system shared memory extension: a client on this machine puts a tensor in a POSIX shared memory region
(`/dev/shm/KEY`) and names it instead of sending its bytes; an output can be written into one the same way.

A same-host feature with a security edge, kept narrow: registering needs the server started with `allow_client_shm`
(Triton's `--allow-client-shm`, off by default too); a key names a file directly under /dev/shm and nothing else;
every offset and size is checked against the region and the tensor; a region is read and written only while it is
registered. The supervisor keeps the registrations and hands them to every worker (control.py), since a client's
next request may reach any of them; each worker maps the regions itself.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..protocol.v2 import ProtocolError

ROOT = Path("/dev/shm")
KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")  # one name, no separators: a region is never outside /dev/shm
ALLOW = "allow_client_shm"  # the setting that turns registration on (config.Config)


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int


def check(name: str, key: str, offset: int, byte_size: int) -> Region:
    """A registration as asked, checked against the file it names (a ProtocolError saying what is wrong)."""
    if not (isinstance(name, str) and 0 < len(name) <= 128):
        raise ProtocolError("a shared memory region needs a name of 1 to 128 characters")
    if not (isinstance(key, str) and KEY.match(key) and key.strip("/") not in (".", "..")):
        raise ProtocolError(f"region {name!r}: key {str(key)[:64]!r} must name a file directly under {ROOT}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, byte_size)) or not byte_size:
        raise ProtocolError(f"region {name!r}: offset and byte_size are non-negative integers, byte_size at least 1")
    path = ROOT / key.lstrip("/")
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        raise ProtocolError(f"region {name!r}: no shared memory region {key!r} on this machine ({path})", 404)
    if offset + byte_size > size:
        raise ProtocolError(
            f"region {name!r}: offset {offset} + byte_size {byte_size} runs past {key!r}'s {size} bytes"
        )
    return Region(name, key, offset, byte_size)


class Regions:
    """A worker's mapped regions, as the supervisor last said they are."""

    def __init__(self):
        self.regions: dict[str, Region] = {}
        self.maps: dict[str, mmap.mmap] = {}

    def apply(self, regions: dict[str, dict]) -> None:
        """Map what is new, unmap what is gone (a region changed is mapped afresh)."""
        wanted = {name: Region(**r) for name, r in regions.items()}
        for name in [n for n in self.regions if self.regions[n] != wanted.get(n)]:
            self.regions.pop(name)
            self.maps.pop(name).close()
        for name, r in wanted.items():
            if name not in self.regions:
                fd = os.open(ROOT / r.key.lstrip("/"), os.O_RDWR)
                try:
                    self.maps[name] = mmap.mmap(fd, r.offset + r.byte_size)
                finally:
                    os.close(fd)
                self.regions[name] = r

    def status(self, name: str | None = None) -> list[dict]:
        if name and name not in self.regions:
            raise ProtocolError(f"no shared memory region {name!r} is registered", 404)
        return [asdict(r) for n, r in sorted(self.regions.items()) if not name or n == name]

    def _span(self, name: str, offset: int, size: int, what: str) -> tuple[mmap.mmap, int]:
        r = self.regions.get(name)
        if r is None:
            raise ProtocolError(f"{what}: shared memory region {str(name)[:64]!r} is not registered")
        if offset < 0 or size < 0 or offset + size > r.byte_size:
            raise ProtocolError(f"{what}: offset {offset} + {size} bytes runs past region {name!r}'s {r.byte_size}")
        return self.maps[name], r.offset + offset

    def read(self, name: str, offset: int, size: int, what: str) -> bytes:
        """SIZE bytes of a registered region from OFFSET (within it): an input's tensor."""
        m, start = self._span(name, offset, size, what)
        return m[start : start + size]

    def write(self, name: str, offset: int, data: bytes, byte_size: int, what: str) -> None:
        """An output's bytes into a registered region, when they fit the size the request gave."""
        if len(data) > byte_size:
            raise ProtocolError(f"{what} is {len(data)} bytes, over the {byte_size} the request gave it")
        m, start = self._span(name, offset, len(data), what)
        m[start : start + len(data)] = data
