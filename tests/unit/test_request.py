"""How a TorchServe request row becomes image bytes and options, and the 4xx each bad row gets."""

import base64

import pytest

from torchship.handlers.model.errors import InputError
from torchship.handlers.torchserve.request import decode_row
from torchship.serve.samples import held_out_digits, png

DIGITS, _ = held_out_digits()


@pytest.mark.parametrize(
    "row,status,message",
    [
        ({}, 400, "empty request"),
        ({"body": {"nodata": 1}}, 400, "'data' field"),
        ({"body": {"data": "!!"}}, 400, "base64"),
        ({"body": b'{"data": '}, 400, "JSON"),
        ({"body": [1, 2]}, 400, "one image"),
        ({"body": b"x", "topk": b"abc"}, 400, "integer"),
    ],
)
def test_request_decoding_errors(row, status, message):
    with pytest.raises(InputError) as e:
        decode_row(row, 10)
    assert e.value.status == status and message in e.value.message


def test_data_urls_and_text_base64_decode():
    digit = png(DIGITS[0])
    url = "data:image/png;base64," + base64.b64encode(digit).decode()
    assert decode_row({"body": {"data": url}}, 10).image == digit
    assert decode_row({"body": base64.b64encode(digit).decode()}, 10).image == digit
