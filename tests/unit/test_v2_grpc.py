"""A large ModelInferRequest parsed with its raw contents as views of its bytes (protocol/v2_grpc.py `split_raw`,
oip/grpc.py `parsing`): the same request as upb's own parse, for well-formed messages and mutated ones alike.
Triton's definition of the message here (tritonclient's, as every test's client side): the server's kserve one is
the same message, field for field."""

from __future__ import annotations

import random

import numpy as np
from tritonclient.grpc import service_pb2 as pb  # not kserve's: one process cannot hold both `inference` packages

from torchship.handlers.oip.grpc import Undecodable, parsing
from torchship.handlers.protocol import v2_grpc

parse = parsing(pb.ModelInferRequest)


def request() -> bytes:
    """Two tensors sent raw (one large), parameters, an output asked for, an id; the first raw content before
    everything else, as protobuf allows a repeated field's elements anywhere."""
    r = pb.ModelInferRequest(model_name="large", model_version="2", id="r1")
    r.parameters["priority"].int64_param = 3
    r.inputs.add(name="note", datatype="BYTES", shape=[1])
    r.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
    r.outputs.add(name="logits")
    pixels = np.random.default_rng(0).standard_normal(3 * 224 * 224).astype(np.float32).tobytes()
    r.raw_input_contents.append(pixels)
    note = pb.ModelInferRequest()
    note.raw_input_contents.append(b"\x05\x00\x00\x00hello")
    return note.SerializeToString() + r.SerializeToString()  # parsed as one message: the note's content comes first


def same(got, want) -> bool:
    """GOT (WithViews or a message) is the request WANT (upb's parse)."""
    if isinstance(got, v2_grpc.WithViews):
        message = type(want)()
        message.CopyFrom(got.message)
        message.raw_input_contents.extend(bytes(v) for v in got.raw_input_contents)
        return message == want
    return got == want


def test_the_field_number_is_the_protos():
    assert pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number == v2_grpc.RAW_INPUT_CONTENTS


def test_a_large_request_keeps_its_raw_contents_as_read_only_views_in_order():
    data = bytearray(request())
    assert len(data) >= v2_grpc.VIEWS_FROM  # the condition this test is about: large enough for views
    got, want = parse(data), pb.ModelInferRequest.FromString(bytes(data))
    assert isinstance(got, v2_grpc.WithViews) and same(got, want)
    assert [bytes(v)[:9] for v in got.raw_input_contents] == [b"\x05\x00\x00\x00hello", want.raw_input_contents[1][:9]]
    assert all(v.readonly and v.obj is not None for v in got.raw_input_contents) and got.ByteSize() == len(data)
    assert got.model_name == "large" and got.id == "r1" and got.parameters["priority"].int64_param == 3
    tensors = v2_grpc.tensors_of(got)
    assert list(tensors[0].data) == [b"hello"] and tensors[1].data.nbytes == 3 * 224 * 224 * 4
    small = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 16]).SerializeToString()
    assert type(parse(small)) is pb.ModelInferRequest  # a small one is upb's own


def test_mutated_requests_parse_as_upb_parses_them_or_are_undecodable_as_there():
    data = request()
    rng = random.Random(0)
    views = 0
    for _ in range(300):
        m = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, 400) if rng.random() < 0.8 else rng.randrange(len(m))  # mostly the message's head
            m[at] = rng.randrange(256)
        cut = bytes(m[: rng.randrange(len(m) // 2, len(m) + 1)]) if rng.random() < 0.3 else bytes(m)
        try:
            want = pb.ModelInferRequest.FromString(cut)
        except Exception:
            want = None
        got = parse(cut)
        if want is None:
            assert isinstance(got, Undecodable)
        else:
            assert same(got, want)
            views += isinstance(got, v2_grpc.WithViews)
    assert views > 50  # the views path was the one compared, often
