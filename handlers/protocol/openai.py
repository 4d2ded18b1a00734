"""OpenAI's embeddings API (`POST /v1/embeddings`), the call LangChain, LlamaIndex and most apps make for sentence
embeddings: its request read into texts, and a text model's embeddings written as its answer; numpy only. Errors
are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which its clients raise with the message."""

from __future__ import annotations

import base64

import numpy as np

from ..limits import MAX_BATCH_ITEMS
from .v2 import ProtocolError

EMBEDDINGS_ROUTE = "/v1/embeddings"
ENCODINGS = ("float", "base64")  # the openai client asks for base64 (little-endian float32) unless told float
KNOWN = {"input", "model", "encoding_format", "dimensions", "user"}


def embeddings_request(body) -> tuple[list[bytes], str, str, int | None]:
    """The texts (UTF-8), the model's name, the encoding and the dimensions asked for; a ProtocolError naming what
    is wrong."""
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object with 'input' and 'model'")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ProtocolError(f"unknown field '{str(unknown[0])[:64]}' (this server reads {', '.join(sorted(KNOWN))})")
    model, texts, fmt = body.get("model"), body.get("input"), body.get("encoding_format") or "float"
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must name a served model")
    if fmt not in ENCODINGS:
        raise ProtocolError(f"'encoding_format' must be one of {', '.join(ENCODINGS)}, not {str(fmt)[:32]!r}")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts:
        raise ProtocolError("'input' must be a string or a non-empty list of strings")
    if len(texts) > MAX_BATCH_ITEMS:
        raise ProtocolError(f"'input' holds {len(texts)} texts, more than {MAX_BATCH_ITEMS}", 413)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ProtocolError(
                f"'input' element {i}: expected a string, got {type(t).__name__} (token ids are not taken)"
            )
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
        raise ProtocolError(f"'dimensions' must be a positive integer, not {str(dimensions)[:32]}")
    return [t.encode("utf-8") for t in texts], model, fmt, dimensions


def embeddings_response(model: str, vectors: np.ndarray, tokens: int, fmt: str, dimensions=None) -> dict:
    """Each row's vector, in the order sent, as floats or as base64 of its float32 bytes."""
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise ProtocolError(f"'dimensions' {dimensions}: {model}'s embeddings have {vectors.shape[1]}")
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(status: int, message: str) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
