"""KServe v1 and TF Serving's request, `{"instances": [[...], ...]}`: the rows of a tensor model as those clients send
them; answered `{"predictions": [...]}`."""

from __future__ import annotations

import json

from ..model.errors import InputError


def instances(body) -> list:
    """The rows of a KServe v1 / TF Serving request, {"instances": [...]}, parsed by TorchServe or not."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError):
            raise InputError(400, 'send JSON {"instances": [[...], ...]}, one row of numbers per example') from None
    if not isinstance(body, dict) or "instances" not in body:
        raise InputError(400, 'send JSON {"instances": [[...], ...]}, one row of numbers per example')
    return body["instances"]
