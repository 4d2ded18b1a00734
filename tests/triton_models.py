"""The models Triton's client examples call (triton-inference-server/client, src/python/examples), as a user would
write them for torchship: a torch module in a file of their own and a signature, exported with `torchship export
--model --signature`. Only the models torchship can express are here."""

import subprocess

from helpers import export_user_model

MODELS = '''
import torch


class Simple(torch.nn.Module):
    """Triton's `simple`: the sum and the difference of two INT32 [batch, 16] tensors. No parameters at all."""

    def forward(self, INPUT0, INPUT1):
        return INPUT0 + INPUT1, INPUT0 - INPUT1


SIMPLE = {
    "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": ["batch", 16]},
               {"name": "INPUT1", "datatype": "INT32", "shape": ["batch", 16]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": ["batch", 16]},
                {"name": "OUTPUT1", "datatype": "INT32", "shape": ["batch", 16]}],
}

class Identity(torch.nn.Module):
    """Triton's `custom_identity_int32` (memory_growth_test.py, the timeout and cancellation tests): INPUT0 back."""

    def forward(self, INPUT0):
        return INPUT0 * 1


IDENTITY_INT32 = {
    "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": ["batch", "n"], "pad": 0}],
    "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": ["batch", "n"]}],
    "dims": {"n": [1, 1024]},
}

# Triton's `simple_string`: `simple`'s network, its integers sent and answered as strings (its own step)
SIMPLE_STRING = {
    **SIMPLE,
    "process": {
        "inputs": [{"name": n, "datatype": "BYTES", "shape": ["batch", 16]} for n in ("INPUT0", "INPUT1")],
        "outputs": [{"name": n, "datatype": "BYTES", "shape": ["batch", 16]} for n in ("OUTPUT0", "OUTPUT1")],
    },
}

# Triton's `simple_identity`: strings back as sent; its step lays each row's strings out as bytes (a count, then
# each string's length and bytes, as Triton's own BYTES layout) that travel through the network and back
SIMPLE_IDENTITY = {
    "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": ["batch", "bytes"], "pad": 0, "range": [0, 255]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "INT32", "shape": ["batch", "bytes"]}],
    "dims": {"bytes": [4, 65536], "n": [1, 1024]},
    "process": {
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": ["batch", "n"]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": ["batch", "n"]}],
    },
}

# Triton's `simple_int8` (grpc_explicit_int8_content_client.py): the same, on INT8 (a range that cannot overflow)
SIMPLE_INT8 = {
    "inputs": [{"name": n, "datatype": "INT8", "shape": ["batch", 16], "range": [-60, 60]}
               for n in ("INPUT0", "INPUT1")],
    "outputs": [{"name": n, "datatype": "INT8", "shape": ["batch", 16]} for n in ("OUTPUT0", "OUTPUT1")],
}
'''
TRITON = {  # name -> (factory, signature)
    "simple": ("Simple", "SIMPLE"),
    "simple_int8": ("Simple", "SIMPLE_INT8"),
    "custom_identity_int32": ("Identity", "IDENTITY_INT32"),
    "simple_string": ("Simple", "SIMPLE_STRING"),
    "simple_identity": ("Identity", "SIMPLE_IDENTITY"),
}
STEPS = {  # name -> its own step file (torch-free: numpy and the standard library)
    "simple_string": '''
"""simple_string's step: each element the decimal text of an INT32, in and out."""
import numpy as np

LOW, HIGH = -(2**31), 2**31 - 1


def number(text: bytes) -> int:
    value = int(text)  # a ValueError for what is not an integer: the client's mistake, a 400
    if not LOW <= value <= HIGH:
        raise ValueError(f"{text[:20]!r} does not fit INT32")
    return value


def preprocess(inputs):
    return {k: np.vectorize(number, otypes=[np.int32])(x) for k, x in inputs.items()}


def postprocess(outputs):
    return {k: np.vectorize(lambda v: str(v).encode(), otypes=[object])(y) for k, y in outputs.items()}


def examples():
    rng = np.random.default_rng(0)
    text = np.vectorize(lambda v: str(v).encode(), otypes=[object])
    return [
        {"INPUT0": text(np.arange(16)[None]), "INPUT1": text(np.ones((1, 16), int))},
        {"INPUT0": text(rng.integers(-1000, 1000, (3, 16))), "INPUT1": text(rng.integers(-1000, 1000, (3, 16)))},
    ]
''',
    "simple_identity": '''
"""simple_identity's step: a row's strings as its bytes (a count, then each length and string), and back."""
import struct

import numpy as np


def preprocess(inputs):
    rows = [
        struct.pack("<I", len(row)) + b"".join(struct.pack("<I", len(s)) + bytes(s) for s in row)
        for row in inputs["INPUT0"]
    ]
    codes = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        codes[i, : len(row)] = np.frombuffer(row, np.uint8)
    return {"INPUT0": codes}


def postprocess(outputs):
    rows = []
    for codes in outputs["OUTPUT0"]:
        data = codes.astype(np.uint8).tobytes()
        (count,), at, row = struct.unpack_from("<I", data), 4, []
        for _ in range(count):
            (size,) = struct.unpack_from("<I", data, at)
            row.append(data[at + 4 : at + 4 + size])
            at += 4 + size
        rows.append(row)
    out = np.empty((len(rows), len(rows[0])), object)
    for i, row in enumerate(rows):  # element by element: numpy would make bytes of one length, dropping NULs
        for j, s in enumerate(row):
            out[i, j] = s
    return {"OUTPUT0": out}


def examples():
    return [
        {"INPUT0": np.array([[b"he\\x00llo"] * 16], object)},
        {"INPUT0": np.array([[b"\\x00\\x01\\x02\\x03", "caf\\u00e9".encode(), b""], [b"a", b"bc", b"def"]], object)},
    ]
''',
}


def export(folder, name: str) -> tuple[subprocess.CompletedProcess, object]:
    """`torchship export` of one of them, its weights saved as a user would (an empty state dict for `simple`)."""
    factory, sig = TRITON[name]
    step = []
    if name in STEPS:
        (folder / f"{name}_step.py").write_text(STEPS[name])
        step = ["--process", folder / f"{name}_step.py"]
    return export_user_model(folder, MODELS, name, factory, sig, *step)
