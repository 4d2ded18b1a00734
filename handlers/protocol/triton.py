"""Triton's extensions of the Open Inference Protocol that its tools call first: the model configuration
(`GET /v2/models/M/config`, gRPC `ModelConfig`: perf_analyzer reads it before it sends anything) and the model
repository (index, load, unload). Built from the card, the same facts as `/v2/models/M`, in Triton's shape.

kserve's protocol definitions (our gRPC messages) have neither, and tritonclient's define the same package
(`inference`) as kserve's, so one process cannot import both: the few messages these calls need are declared here,
field for field as Triton's grpc_service.proto and model_config.proto number them (only the wire format matters to
a client), in a descriptor pool of their own.
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from ..card import ModelCard
from ..limits import MAX_BATCH_ITEMS
from .model_io import ARRAY, input_types, output_types

DATA_TYPES = {  # Triton's DataType enum, by v2 datatype name
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    "BYTES": 13,
    "BF16": 14,
}
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch", "pytorch_aotinductor": "pytorch"}


def _dims(shape: list[int]) -> dict:
    """Triton's dims leave out the batch dimension; a tensor that is only a batch ([N], as metadata and answers have
    it) is dims [1] reshaped to [] per row, Triton's own way to say so (a plain [1] would mean [N, 1])."""
    return {"dims": list(shape[1:])} if len(shape) > 1 else {"dims": [1], "reshape": {"shape": []}}


def config(
    card: ModelCard,
    name: str,
    platform: str,
    *,
    max_batch_delay_ms: float,
    max_batch: int,
    max_batch_size: int = MAX_BATCH_ITEMS,
    images: bool = True,
) -> dict:
    """The model configuration as Triton's JSON has it: an image model's two inputs optional (it takes `images` or
    `input`, one of them per request), or its FP32 input alone (IMAGES False), FORMAT_NCHW, as Triton's image
    clients and perf_analyzer's shared memory want it."""
    optional = card.image and images  # one of two inputs: our image models take `images` or `input`
    return {
        "name": name,
        "platform": platform,
        "backend": PLATFORM_BACKENDS.get(platform, platform),
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch_size,
        "input": [
            {
                "name": t["name"],
                "data_type": f"TYPE_{'STRING' if t['datatype'] == 'BYTES' else t['datatype']}",
                "format": "FORMAT_NCHW" if card.image and t["name"] == ARRAY else "FORMAT_NONE",
                **_dims(t["shape"]),
                "optional": optional,
            }
            for t in input_types(card, images)
        ],
        "output": [
            {
                "name": t["name"],
                "data_type": f"TYPE_{'STRING' if t['datatype'] == 'BYTES' else t['datatype']}",
                **_dims(t["shape"]),
            }
            for t in output_types(card, images)
        ],
        "dynamic_batching": {
            "preferred_batch_size": [max_batch],
            "max_queue_delay_microseconds": int(max_batch_delay_ms * 1000),
        },
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": 1}],
    }


@functools.cache
def messages():
    """Triton's ModelConfig and repository messages, as classes: {name: class}."""
    f = descriptor_pb2.FileDescriptorProto(name="torchship_triton.proto", package="torchship.triton", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    STRING, INT32, INT64, UINT64, BOOL, BYTES, MESSAGE, ENUM = (
        T.TYPE_STRING,
        T.TYPE_INT32,
        T.TYPE_INT64,
        T.TYPE_UINT64,
        T.TYPE_BOOL,
        T.TYPE_BYTES,
        T.TYPE_MESSAGE,
        T.TYPE_ENUM,
    )

    def message(name, *fields):
        m = f.message_type.add(name=name)
        for number, fname, ftype, *rest in fields:
            repeated = rest[1] if len(rest) > 1 else False
            field = m.field.add(
                name=fname, number=number, type=ftype, label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL
            )
            if rest and rest[0]:
                field.type_name = rest[0]
        return m

    data_type = f.enum_type.add(name="DataType")
    data_type.value.add(name="TYPE_INVALID", number=0)
    for dname, number in DATA_TYPES.items():
        data_type.value.add(name=f"TYPE_{'STRING' if dname == 'BYTES' else dname}", number=number)
    fmt = f.enum_type.add(name="Format")
    for i, fname in enumerate(("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW")):
        fmt.value.add(name=fname, number=i)
    p = ".torchship.triton."
    message("ModelTensorReshape", (1, "shape", INT64, None, True))
    message(
        "ModelInput",
        (1, "name", STRING),
        (2, "data_type", ENUM, p + "DataType"),
        (3, "format", ENUM, p + "Format"),
        (4, "dims", INT64, None, True),
        (5, "reshape", MESSAGE, p + "ModelTensorReshape"),
        (8, "optional", BOOL),
    )
    message(
        "ModelOutput",
        (1, "name", STRING),
        (2, "data_type", ENUM, p + "DataType"),
        (3, "dims", INT64, None, True),
        (5, "reshape", MESSAGE, p + "ModelTensorReshape"),
    )
    message(
        "ModelDynamicBatching",
        (1, "preferred_batch_size", INT32, None, True),
        (2, "max_queue_delay_microseconds", UINT64),
    )
    message(
        "ModelConfig",
        (1, "name", STRING),
        (2, "platform", STRING),
        (17, "backend", STRING),
        (4, "max_batch_size", INT32),
        (5, "input", MESSAGE, p + "ModelInput", True),
        (6, "output", MESSAGE, p + "ModelOutput", True),
        (11, "dynamic_batching", MESSAGE, p + "ModelDynamicBatching"),
    )
    message("ModelConfigRequest", (1, "name", STRING), (2, "version", STRING))
    message("ModelConfigResponse", (1, "config", MESSAGE, p + "ModelConfig"))
    message(
        "ModelRepositoryParameter",
        (1, "bool_param", BOOL),
        (2, "int64_param", INT64),
        (3, "string_param", STRING),
        (4, "bytes_param", BYTES),
    )
    message("RepositoryIndexRequest", (1, "repository_name", STRING), (2, "ready", BOOL))
    index = message("RepositoryIndexResponse", (1, "models", MESSAGE, p + "RepositoryIndexResponse.ModelIndex", True))
    entry = index.nested_type.add(name="ModelIndex")
    for number, fname in ((1, "name"), (2, "version"), (3, "state"), (4, "reason")):
        entry.field.add(name=fname, number=number, type=STRING, label=T.LABEL_OPTIONAL)
    for call in ("RepositoryModelLoadRequest", "RepositoryModelUnloadRequest"):
        m = message(
            call,
            (1, "repository_name", STRING),
            (2, "model_name", STRING),
            (3, "parameters", MESSAGE, f"{p}{call}.ParametersEntry", True),
        )
        e = m.nested_type.add(name="ParametersEntry")
        e.options.map_entry = True
        e.field.add(name="key", number=1, type=STRING, label=T.LABEL_OPTIONAL)
        e.field.add(
            name="value", number=2, type=MESSAGE, type_name=p + "ModelRepositoryParameter", label=T.LABEL_OPTIONAL
        )
    message("RepositoryModelLoadResponse")
    message("RepositoryModelUnloadResponse")
    # the statistics extension
    message("StatisticDuration", (1, "count", UINT64), (2, "ns", UINT64))
    duration = p + "StatisticDuration"
    stats = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
    message("InferStatistics", *((k + 1, name, MESSAGE, duration) for k, name in enumerate(stats)))
    message(
        "InferBatchStatistics",
        (1, "batch_size", UINT64),
        *(
            (k + 2, name, MESSAGE, duration)
            for k, name in enumerate(("compute_input", "compute_infer", "compute_output"))
        ),
    )
    message(
        "ModelStatistics",
        (1, "name", STRING),
        (2, "version", STRING),
        (3, "last_inference", UINT64),
        (4, "inference_count", UINT64),
        (5, "execution_count", UINT64),
        (6, "inference_stats", MESSAGE, p + "InferStatistics"),
        (7, "batch_stats", MESSAGE, p + "InferBatchStatistics", True),
    )
    message("ModelStatisticsRequest", (1, "name", STRING), (2, "version", STRING))
    # the system shared memory extension
    message("SystemSharedMemoryStatusRequest", (1, "name", STRING))
    status = message(
        "SystemSharedMemoryStatusResponse",
        (1, "regions", MESSAGE, p + "SystemSharedMemoryStatusResponse.RegionsEntry", True),
    )
    region = status.nested_type.add(name="RegionStatus")
    for number, fname, ftype in (
        (1, "name", STRING),
        (2, "key", STRING),
        (3, "offset", UINT64),
        (4, "byte_size", UINT64),
    ):
        region.field.add(name=fname, number=number, type=ftype, label=T.LABEL_OPTIONAL)
    entry = status.nested_type.add(name="RegionsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=STRING, label=T.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=MESSAGE,
        label=T.LABEL_OPTIONAL,
        type_name=p + "SystemSharedMemoryStatusResponse.RegionStatus",
    )
    message(
        "SystemSharedMemoryRegisterRequest",
        (1, "name", STRING),
        (2, "key", STRING),
        (3, "offset", UINT64),
        (4, "byte_size", UINT64),
    )
    message("SystemSharedMemoryRegisterResponse")
    message("SystemSharedMemoryUnregisterRequest", (1, "name", STRING))
    message("SystemSharedMemoryUnregisterResponse")
    message("ModelStatisticsResponse", (1, "model_stats", MESSAGE, p + "ModelStatistics", True))
    pool = descriptor_pool.DescriptorPool()
    file = pool.Add(f)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"torchship.triton.{name}"))
        for name in file.message_types_by_name
    }


def config_message(cfg: dict):
    """The JSON configuration as the gRPC ModelConfigResponse (the fields Triton's clients read)."""
    return json_format.ParseDict({"config": cfg}, messages()["ModelConfigResponse"](), ignore_unknown_fields=True)


def statistics_message(stats: dict):
    """The statistics extension's JSON as the gRPC ModelStatisticsResponse."""
    return json_format.ParseDict(stats, messages()["ModelStatisticsResponse"]())


def parameters(request) -> dict:
    """A repository call's parameters as plain values (whichever of Triton's one-of fields is set)."""
    return {
        key: p.string_param or p.int64_param or p.bool_param or p.bytes_param.decode(errors="replace")
        for key, p in request.parameters.items()
    }
