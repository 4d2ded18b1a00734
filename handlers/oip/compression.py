"""HTTP content codings on the inference route, as Triton's server does them (src/http_server.cc) and tritonclient
asks for them (`request_compression_algorithm`, `response_compression_algorithm`): a gzip or deflate request body is
decompressed up to the body limit, which applies to what it decompresses to, so a zip bomb costs its first megabytes
and a 413; an answer is compressed when the client's Accept-Encoding prefers gzip or deflate."""

from __future__ import annotations

import zlib

from ..protocol.v2 import ProtocolError

CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib's window bits for each
ACCEPTED = b"gzip, deflate"  # what a 501 tells a client to send instead


def decompress(body: bytes, coding: str, limit: int) -> bytes:
    """BODY decoded, or a ProtocolError: 413 past LIMIT decompressed bytes, 400 for a body that is not what it says."""
    for wbits in (CODINGS[coding], -zlib.MAX_WBITS) if coding == "deflate" else (CODINGS[coding],):  # raw deflate too
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or d.unconsumed_tail:
            raise ProtocolError(f"the {coding} body decompresses to more than the {limit}-byte limit", 413)
        if not d.eof:
            raise ProtocolError(f"the {coding} body is truncated")
        return out
    raise ProtocolError(f"the body is not {coding} data (Content-Encoding: {coding})")


def preferred(accept: bytes | None) -> str | None:
    """The coding an Accept-Encoding header weighs highest among ours (q=0 refuses one), or None for none."""
    best, best_q = None, 0.0
    for item in (accept or b"").decode("latin-1").lower().split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if name in CODINGS and q > best_q:
            best, best_q = name, q
    return best


def compress(body: bytes, coding: str) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, CODINGS[coding])
    return c.compress(body) + c.flush()
