"""For those who want kserve's own ModelServer: our model as a `kserve.Model`, and the one small adapter that patches
what kserve 0.21 gets wrong. Torch-free, the same card, recipe and answers as every other entry point.

python -m torchship.handlers.kserve --model_dir EXPORT_DIR --model_name NAME [kserve's own flags]

torchship's own server (oip_server.py) is the faster path: kserve's FastAPI layer costs ~0.5 ms a request and its
server runs no batching (bench/NOTES.md). tests/test_oip.py fails if kserve changes under the patches below.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
import uuid

import kserve
import kserve.model_server as ms
from kserve.errors import InvalidInput
from kserve.model_server import parser as kserve_parser
from kserve.protocol.grpc import server as grpc_server
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput

from ..card import ModelCard
from ..model import runners, steps
from ..model.images import Preprocessor
from ..model.responses import batch_outputs
from ..protocol import model_io, v2

logger = logging.getLogger(__name__)


class KServeModel(kserve.Model):
    def __init__(self, name: str, model_dir: str, *, backend: str = "onnx", threads: int = 1, max_pixels: int = 0):
        super().__init__(name)
        self.model_dir, self.backend, self.threads, self.max_pixels = model_dir, backend, threads, max_pixels
        self.card = None

    def load(self) -> bool:
        """Ready only once the card validates and the model file runs."""
        self.card = ModelCard.load(self.model_dir)
        self.runner = runners.load(self.model_dir, self.backend, threads=self.threads, card=self.card)
        self.preprocessor = Preprocessor(self.card, self.max_pixels)
        self.steps = steps.load(self.card.signature, self.model_dir)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return model_io.input_types(self.card)

    def get_output_types(self) -> list[dict]:
        return model_io.output_types(self.card)

    async def predict(self, payload, headers=None) -> InferResponse:
        """One forward pass for all N images or arrays of the request."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this model speaks the Open Inference Protocol: POST /v2/models/NAME/infer")
        tensors = []
        for i in payload.inputs:
            try:
                tensors.append(v2.Tensor(i.name, i.datatype, tuple(int(d) for d in i.shape), i.as_numpy()))
            except (ValueError, TypeError, InvalidInput):
                raise InvalidInput(
                    f"input '{i.name}': its {i.datatype} values do not fill its shape {list(i.shape)}"
                ) from None
        try:
            x = model_io.model_inputs(self.card, self.preprocessor, tensors, steps=self.steps)
        except v2.ProtocolError as e:
            raise InvalidInput(str(e)) from None
        outputs = []
        binary = payload.from_grpc or payload.use_binary_outputs  # gRPC: raw contents, or tritonclient reads []
        raw = self.runner.run(x.arrays if self.card.named else x)
        inputs = x  # a named request's rows (its own step reads them), an image batch's sizes (boxes, masks)
        for t in model_io.model_outputs(self.card, batch_outputs(self.card, raw), self.steps, inputs):
            out = InferOutput(name=t.name, shape=list(t.shape), datatype=t.datatype)
            out.set_data_from_numpy(t.data, binary_data=binary)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
            requested_outputs=payload.request_outputs,
        )


def from_bytes(cls, req_bytes: bytes, json_length: int, model_name: str) -> InferRequest:
    """A REST request with binary tensors, parsed by protocol/v2.py.

    kserve 0.21's own decodes binary BYTES inputs to UTF-8 text, which an image file never is (a 500 for
    every tritonclient request), and a body without 'inputs' is a KeyError (another 500): here each is kept
    raw, or is a 400 that says what is wrong."""
    try:
        header, tensors = v2.parse_http(req_bytes, json_length)
    except v2.ProtocolError as e:
        raise InvalidInput(str(e)) from None
    inputs = []
    for t in tensors:
        infer_input = InferInput(name=t.name, shape=list(t.shape), datatype=t.datatype)
        infer_input.data = list(t.data) if t.datatype == "BYTES" else t.data
        inputs.append(infer_input)
    outputs = header.get("outputs")
    requested = (
        [
            RequestedOutput(name=o["name"], parameters=o.get("parameters"))
            for o in outputs
            if isinstance(o, dict) and "name" in o
        ]
        if isinstance(outputs, list)
        else None
    )
    return cls(
        model_name=model_name,
        request_id=header.get("id"),
        parameters=header.get("parameters"),
        infer_inputs=inputs,
        request_outputs=requested,
    )


# What patch_kserve() replaces, by name: the test checks that each is still there and still needs replacing.
PATCHED = (
    "kserve.model_server.RESTServer",
    "kserve.protocol.grpc.server.aio.server",
    "kserve.protocol.infer_type.InferRequest.from_bytes",
)


def patch_kserve(host: str) -> None:
    """kserve 0.21 hard-codes 0.0.0.0 (REST) and [::] (gRPC): make both listen where we were told; and parse REST
    bodies with binary tensors ourselves (from_bytes above)."""

    class BoundREST(ms.RESTServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.host = host

    original = grpc_server.aio.server

    def server(*args, **kwargs):
        srv = original(*args, **kwargs)
        add = srv.add_insecure_port
        srv.add_insecure_port = lambda address: add(f"{host}:{address.rsplit(':', 1)[1]}")
        return srv

    ms.RESTServer = BoundREST
    grpc_server.aio.server = server
    InferRequest.from_bytes = classmethod(from_bytes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(parents=[kserve_parser], conflict_handler="resolve", description=__doc__)
    ap.add_argument("--model_dir", required=True, help="an export directory: meta.json and model.onnx")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (REST and gRPC)")
    ap.add_argument("--backend", default="onnx", help="which exported file to run: onnx, onnx-int8, ...")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max_pixels", type=int, default=0, help="largest decoded image (0: the card's default)")
    args, _ = ap.parse_known_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        logger.warning(
            "listening on %s: the Open Inference Protocol has no authentication of its own; put an "
            "authenticating proxy in front (README, the OIP runtime)",
            args.host,
        )
    patch_kserve(args.host)
    model = KServeModel(
        args.model_name, args.model_dir, backend=args.backend, threads=args.threads, max_pixels=args.max_pixels
    )
    model.load()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1).start([model])


if __name__ == "__main__":
    main(sys.argv[1:])
