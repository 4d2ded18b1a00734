"""A model's named inputs and outputs as its card states them (the signature): each tensor's datatype, its shape with
a name for every dimension that varies, the range of those dimensions and of the values; stdlib only. The runtime
checks requests against it and pads them into batches (model/named.py); the proof draws its inputs from it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .fields import CardError, is_number, sequence, sub

BATCH_DIM = "batch"  # a signature's first dimension, always: requests of any batch size are stacked along it
# The datatypes a signature may name (v2's names); BF16 stays out: numpy, and so every runtime, has no bfloat16.
SIGNATURE_DATATYPES = ("FP32", "FP16", "FP64", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL")
# A model's own step may also take and give strings (one UTF-8 or binary element each); the network never does.
STEP_DATATYPES = (*SIGNATURE_DATATYPES, "BYTES")
STEP_FUNCTIONS = ("preprocess", "postprocess")  # what a step file may define (model/steps.py runs them)
# A text model's answers (model/text.py): a label and probabilities, an embedding, or labels per token
TEXT_TASKS = ("classify", "embed", "tokens")
TEXT_INPUT = "text"  # what a text model takes: BYTES [batch], one UTF-8 string a row
TEXT_PAIR_INPUT = "text_pair"  # and a pair task's second text (Text.pairs), as Hugging Face names it
EMBEDDING = "embedding"  # what an embedding model answers: FP32 [batch, n]
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer gives, by Hugging Face's names
POOLINGS = ("mean", "cls")
MAX_DIM = 1 << 20  # a named dimension's largest allowed upper bound
TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: its v2 datatype, its shape (the batch first, a name for each dynamic dimension),
    the values an input may hold (token ids within the vocabulary, masks 0..1) and what pads a shorter row."""

    name: str
    datatype: str
    shape: tuple  # ("batch", "sequence") or ("batch", 13): integers and dimension names
    range: tuple = ()  # inputs: (min, max) of every value, inclusive; the proof draws from it, servers enforce it
    pad: float | int | None = None  # inputs: the value that lengthens a row to a batch's longest (a mask's 0)
    mask: bool = False  # an attention mask: 1 where a row has a token, 0 after; a row of 0s has no defined answer

    def __post_init__(self):
        object.__setattr__(self, "shape", sequence(f"{self.name}.shape", self.shape))
        object.__setattr__(self, "range", sequence(f"{self.name}.range", self.range))

    @property
    def dynamic(self) -> tuple[str, ...]:
        """The named dimensions after the batch."""
        return tuple(d for d in self.shape[1:] if isinstance(d, str))


@dataclass(frozen=True)
class Step:
    """A model's own pre- and post-processing: a torch-free Python file shipped beside the model, and the tensors
    clients send to its preprocess (inputs) and get from its postprocess (outputs); a side without its function
    stays the network's own."""

    file: str = ""  # the file's name inside the export folder (export fills it, with its digest)
    sha256: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def __post_init__(self):
        for side in ("inputs", "outputs"):
            specs = sequence(f"process.{side}", getattr(self, side))
            object.__setattr__(
                self,
                side,
                tuple(s if isinstance(s, TensorSpec) else sub(TensorSpec, f"process.{side}", s) for s in specs),
            )


@dataclass(frozen=True)
class Text:
    """A model that takes text: its tokenizer (a Hugging Face tokenizer.json shipped beside it, run with `tokenizers`)
    and what it answers. The network's inputs are the tokenizer's (TOKEN_INPUTS) along one padded dimension."""

    task: str = "classify"
    tokenizer: str = "tokenizer.json"  # the file's name inside the export folder
    sha256: str = ""
    labels: tuple[str, ...] = ()  # classify: one per class; tokens: one per token class
    pooling: str = "mean"  # embed: over the attention mask, or the first ([CLS]) token
    normalize: bool = True  # embed: to unit L2 length
    truncate: bool = True  # a text longer than the sequence's longest is cut (False: refused, 413)
    pairs: bool = False  # each row two texts (text, text_pair) through the tokenizer's pair template (NLI, reranking)

    def __post_init__(self):
        object.__setattr__(self, "labels", sequence("text.labels", self.labels))


@dataclass(frozen=True)
class Signature:
    """Every input and output of a model that takes several named tensors, and the allowed range of each named
    dimension (batch's is the servers' own limit)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping = field(default_factory=dict)  # "sequence" -> (min, max), inclusive
    process: Step | None = None  # the model's own step, between what clients send and get and the network
    text: Text | None = None  # a text model: its tokenizer and its task (the step torchship brings)

    def __post_init__(self):
        if isinstance(self.process, Mapping):
            object.__setattr__(self, "process", sub(Step, "process", self.process))
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", sub(Text, "text", self.text))
        for side in ("inputs", "outputs"):
            specs = sequence(side, getattr(self, side))
            object.__setattr__(
                self, side, tuple(s if isinstance(s, TensorSpec) else sub(TensorSpec, side, s) for s in specs)
            )
        if not isinstance(self.dims, Mapping):
            raise CardError("signature.dims", f"expected an object of name: [min, max], got {self.dims!r}"[:200])
        object.__setattr__(self, "dims", {k: tuple(sequence(f"dims.{k}", v)) for k, v in self.dims.items()})

    @property
    def served_inputs(self) -> tuple[TensorSpec, ...]:
        """What clients send: text, or the step's preprocess inputs where it has one, else the network's."""
        if self.text:
            names = (TEXT_INPUT, TEXT_PAIR_INPUT) if self.text.pairs else (TEXT_INPUT,)
            return tuple(TensorSpec(n, "BYTES", (BATCH_DIM,)) for n in names)
        return self.process.inputs if self.process and self.process.inputs else self.inputs

    @property
    def served_outputs(self) -> tuple[TensorSpec, ...]:
        if self.text:
            return text_outputs(self)
        return self.process.outputs if self.process and self.process.outputs else self.outputs

    def to_dict(self) -> dict:
        def spec(t: TensorSpec) -> dict:
            return {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                **({"range": list(t.range)} if t.range else {}),
                **({"pad": t.pad} if t.pad is not None else {}),
                **({"mask": True} if t.mask else {}),
            }

        return {
            "inputs": [spec(t) for t in self.inputs],
            "outputs": [spec(t) for t in self.outputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
            **(
                {
                    "process": {
                        "file": self.process.file,
                        "sha256": self.process.sha256,
                        "inputs": [spec(t) for t in self.process.inputs],
                        "outputs": [spec(t) for t in self.process.outputs],
                    }
                }
                if self.process
                else {}
            ),
            **({"text": {**asdict(self.text), "labels": list(self.text.labels)}} if self.text else {}),
        }


def text_outputs(sig: Signature) -> tuple[TensorSpec, ...]:
    """A text model's answer by task: probabilities and a label; an embedding (the network's first output's last
    dimension); or each row's labelled tokens as JSON (Hugging Face's token-classification pipeline's entries)."""
    task = sig.text.task
    if task == "classify":
        n = len(sig.text.labels) or sig.outputs[0].shape[-1]
        return (TensorSpec("probabilities", "FP32", (BATCH_DIM, n)), TensorSpec("label", "BYTES", (BATCH_DIM,)))
    if task == "embed":
        return (TensorSpec(EMBEDDING, "FP32", (BATCH_DIM, sig.outputs[0].shape[-1])),)
    return (TensorSpec("entities", "BYTES", (BATCH_DIM,)),)


def validate_text(sig: Signature) -> None:
    """A text model's network takes the tokenizer's tensors along one padded dimension; its first output is what
    the task reads."""
    text = sig.text

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise CardError(f"signature.text.{name}", message)

    need(text.task in TEXT_TASKS, "task", f"{text.task!r} is not one of {', '.join(TEXT_TASKS)}")
    need(text.pooling in POOLINGS, "pooling", f"{text.pooling!r} is not one of {', '.join(POOLINGS)}")
    need(not sig.process, "process", "a text model's step is its tokenizer: it takes no step file besides")
    names = [t.name for t in sig.inputs]
    need(
        "input_ids" in names and set(names) <= set(TOKEN_INPUTS),
        "inputs",
        f"a text model's network takes input_ids (and attention_mask, token_type_ids), got {names}",
    )
    seqs = {t.dynamic for t in sig.inputs}
    need(
        all(t.datatype in ("INT64", "INT32") and len(t.shape) == 2 and t.pad is not None for t in sig.inputs)
        and len(seqs) == 1
        and len(next(iter(seqs))) == 1,
        "inputs",
        "each token input is INT64 or INT32 [batch, sequence], one named sequence for all, with a pad value",
    )
    first = sig.outputs[0]
    last = first.shape[-1]
    want = {"classify": 2, "embed": (2, 3), "tokens": 3}[text.task]
    need(
        len(first.shape) in (want if isinstance(want, tuple) else (want,))
        and isinstance(last, int)
        and first.datatype.startswith("FP"),
        "task",
        f"{text.task} reads the first output as floats [batch, {'sequence, ' if want == 3 else ''}n] with n a "
        f"number, got {first.name} {first.datatype} {list(first.shape)}",
    )
    if text.labels or text.task != "embed":
        need(
            len(text.labels) == last,
            "labels",
            f"{len(text.labels)} label(s) for the {last} values of output '{first.name}'",
        )


def validate_signature(sig: Signature) -> None:
    """Names unique and usable on the wire, shapes batch-first, every named dimension given a range, ranges sane."""

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise CardError(f"signature.{name}", message)

    for name, (low, high) in ((k, v if len(v) == 2 else (0, -1)) for k, v in sig.dims.items()):
        need(
            isinstance(name, str) and bool(TENSOR_NAME.match(name)) and name != BATCH_DIM,
            f"dims.{name}",
            f"{name!r} is not a dimension name (and '{BATCH_DIM}' is the servers' own)",
        )
        need(
            all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and 1 <= low <= high <= MAX_DIM,
            f"dims.{name}",
            f"expected [min, max] with 1 <= min <= max <= {MAX_DIM}, got {list(sig.dims[name])}",
        )
    if sig.text:
        validate_text(sig)
    step = sig.process or Step()
    sides = [("inputs", sig.inputs, SIGNATURE_DATATYPES), ("outputs", sig.outputs, SIGNATURE_DATATYPES)]
    sides += [
        (f"process.{s}", specs, STEP_DATATYPES) for s, specs in (("inputs", step.inputs), ("outputs", step.outputs))
    ]
    for side, specs, datatypes in sides:
        if side.startswith("process.") and not specs:
            continue  # the network's own tensors on that side
        need(1 <= len(specs) <= 64, side, f"expected 1 to 64 tensors, got {len(specs)}")
        names = [t.name for t in specs]
        need(len(set(names)) == len(names), side, f"names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        for t in specs:
            where = f"{side}.{t.name}"
            need(isinstance(t.name, str) and bool(TENSOR_NAME.match(t.name)), where, f"{t.name!r} is not a tensor name")
            need(
                t.datatype in datatypes,
                where,
                f"datatype {t.datatype!r} is not one of {', '.join(datatypes)}"
                + (" (strings go through a model's own step: process)" if t.datatype == "BYTES" else ""),
            )
            need(
                t.datatype != "BYTES" or (not t.range and t.pad is None and not t.mask),
                where,
                "a BYTES tensor takes no range, pad or mask",
            )
            need(
                1 <= len(t.shape) <= 8 and t.shape[0] == BATCH_DIM,
                where,
                f"a shape is '{BATCH_DIM}' then up to 7 dimensions, got {list(t.shape)}",
            )
            for d in t.shape[1:]:
                need(
                    (isinstance(d, int) and not isinstance(d, bool) and d >= 1) or d in sig.dims,
                    where,
                    f"dimension {d!r}: a positive integer or a name given a range in dims ({', '.join(sig.dims)})",
                )
            need(
                not t.range
                or (
                    len(t.range) == 2
                    and all(is_number(v) and math.isfinite(v) for v in t.range)
                    and t.range[0] <= t.range[1]
                ),
                where,
                f"range must be [min, max] with min <= max, got {list(t.range)}",
            )
            need(side.endswith("inputs") or (not t.range and t.pad is None), where, "range and pad are for inputs")
            need(
                t.pad is None or (is_number(t.pad) and bool(t.dynamic)),
                where,
                "pad is a number, for an input with a named dimension after the batch",
            )
            need(
                not t.mask
                or (
                    side.endswith("inputs")
                    and t.datatype in ("INT64", "INT32", "BOOL")
                    and t.pad == 0
                    and bool(t.dynamic)
                ),
                where,
                "a mask is an integer or boolean input with a named dimension, padded with 0",
            )
            need(
                t.pad is None or not t.range or t.range[0] <= t.pad <= t.range[1],
                where,
                f"pad {t.pad} lies outside the input's range {list(t.range)}",
            )
    for ins, outs in {(sig.inputs, sig.outputs), (sig.served_inputs, sig.served_outputs)}:
        used = {d for t in ins for d in t.dynamic}
        need(
            all(d in used for t in outs for d in t.dynamic),
            "outputs",
            "an output's named dimension must be one some input has (its length comes from the request)",
        )
    padded = {d for t in sig.inputs if t.pad is not None for d in t.dynamic}
    need(
        not padded or all(t.pad is not None for t in sig.inputs if set(t.dynamic) & padded),
        "inputs",
        "where one input is padded along a dimension, every input with that dimension needs a pad value",
    )
