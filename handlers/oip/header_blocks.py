"""HTTP/2's header blocks (HPACK, RFC 7541) for http2.py: a client's decoded by `hpack` (python-hyper's), with what
gRPC clients send for every call after the first decoded once per connection; ours written as literal fields that no
table indexes, so that a fixed answer's headers are bytes made once and no state is shared with the client."""

from __future__ import annotations

import hpack

BLOCK_FACTOR = 8  # a header block that decodes to more than this many times the head limit closes the connection
BLOCKS_KEPT = 64  # header blocks remembered per connection


def _int(n: int) -> bytes:
    """HPACK's integer with a 7-bit prefix (a string's length, Huffman off)."""
    if n < 127:
        return bytes((n,))
    out, n = [127], n - 127
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes((*out, n))


def block(*fields: tuple[bytes, bytes]) -> bytes:
    """A header block of literal fields that the peer's table does not index (so no state is shared with it)."""
    return b"".join(b"\x00" + _int(len(n)) + n + _int(len(v)) + v for n, v in fields)


def indexed_only(data: bytes) -> bool:
    """A header block of fields from the tables alone, each index under 127 (one byte each): gRPC clients send every
    call's headers so once the first call has put them in the table. Exists for speed: hpack decoded such a block in
    ~230 µs on a slow day here (bench/NOTES.md, lever 65)."""
    return bool(data) and min(data) >= 0x80 and max(data) < 0xFF


class Blocks:
    """One connection's decoding side: its HPACK table, and the blocks of indexed fields alone already decoded (they
    change no table, so they decode the same until a block that does arrives)."""

    def __init__(self, head_bytes: int):
        self.decoder = hpack.Decoder(max_header_list_size=head_bytes * BLOCK_FACTOR)
        self.known: dict[bytes, tuple[dict[bytes, bytes], int]] = {}

    def decode(self, data: bytes) -> tuple[dict[bytes, bytes], int]:
        """The block's headers (a repeated name keeps its last) and their size as HTTP/2 counts it; hpack's
        OversizedHeaderListError past the limit, its HPACKError for what it cannot decode."""
        known = self.known.get(data)
        if known is not None:
            return known
        fields = self.decoder.decode(data, raw=True)
        known = dict(fields), sum(len(n) + len(v) + 32 for n, v in fields)
        if indexed_only(data):
            if len(self.known) >= BLOCKS_KEPT:
                self.known.clear()
            self.known[data] = known
        else:
            self.known.clear()
        return known
