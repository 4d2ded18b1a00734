"""The models Triton's client examples call (triton-inference-server/client, src/python/examples), as a user would
write them for torchship: a torch module in a file of their own and a signature, exported with `torchship export
--model --signature`. Only the models torchship can express are here."""

import subprocess

import torch

from helpers import TORCHSHIP

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
}


def export(folder, name: str) -> tuple[subprocess.CompletedProcess, object]:
    """`torchship export` of one of them, its weights saved as a user would (an empty state dict for `simple`)."""
    factory, sig = TRITON[name]
    (folder / "models.py").write_text(MODELS)
    namespace: dict = {}
    exec(compile(MODELS, str(folder / "models.py"), "exec"), namespace)
    torch.save(namespace[factory]().state_dict(), folder / f"{name}.pt")
    out = folder / name
    r = subprocess.run(
        [
            *TORCHSHIP,
            "export",
            "--model",
            f"{folder / 'models.py'}:{factory}",
            "--weights",
            folder / f"{name}.pt",
            "--signature",
            f"{folder / 'models.py'}:{sig}",
            "--name",
            name,
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r, out
