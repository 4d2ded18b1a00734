"""`torchship export` and `torchship verify`: thin click layers over export.formats and export.proof."""

from __future__ import annotations

from pathlib import Path

import click

from torchship.export.cli_values import floats, format_list, names, shape, value_range
from torchship.export.proof.tolerance import ATOL, RTOL
from torchship.export.weights_enum import WeightsEnumError, read
from torchship.handlers.card import VERSION_PATTERN, CardError, safe_name
from torchship.handlers.formats import DEFAULT_FORMATS, FORMAT_BY_NAME
from torchship.handlers.recipes import RECIPES
from torchship.handlers.signature import POOLINGS, TEXT_TASKS, Text

TOLERANCES = [
    click.option("--atol", type=click.FloatRange(min=0), default=ATOL, show_default=True, help="Absolute tolerance."),
    click.option("--rtol", type=click.FloatRange(min=0), default=RTOL, show_default=True, help="Relative tolerance."),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default="data",
        show_default=True,
        help="Where datasets live; the proof uses the card's held-out images when they are there.",
    ),
]


def tolerances(f):
    for option in reversed(TOLERANCES):
        f = option(f)
    return f


def run_proof(export_dir, atol, rtol, data_dir, source=None) -> None:
    # torch only when a command runs: `torchship --help` and a bad option answer in a fraction of a second
    from torchship.export.proof.report import VerificationError, failure_message, table, write_report
    from torchship.export.proof.verify import verify

    click.echo("proving the export computes the eager model's function ...", err=True)
    try:
        report = verify(export_dir, atol, rtol, source, data_dir)
    except VerificationError as e:
        raise click.ClickException(str(e)) from None
    path = write_report(report, export_dir)
    click.echo(table(report))
    click.echo(f"wrote {path}")
    if not report.passed:
        raise click.ClickException(failure_message(report))


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False), required=False)
@click.option(
    "--model",
    "spec",
    default=None,
    help="Your own model instead of a checkpoint: package.module:callable or path/to/file.py:Callable.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="With --model: a state dict file (torch.save(model.state_dict(), FILE)).",
)
@click.option(
    "--weights-enum",
    default=None,
    metavar="module:Enum.MEMBER",
    help="With --model: the torchvision weights enum your weights were trained as (e.g. "
    "torchvision.models:ResNet50_Weights.IMAGENET1K_V2): the card takes its mean, std, resize, crop and categories "
    "(nothing is downloaded).",
)
@click.option(
    "--model-kwarg",
    "kwargs",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --model: a constructor argument (Python literal), e.g. num_classes=10. Repeatable.",
)
@click.option(
    "--input-shape",
    callback=shape,
    default=None,
    metavar="SHAPE",
    help="With --model: C,H,W for images (3,224,224; a torchvision detector's by default); a row's for tensors (13).",
)
@click.option(
    "--input-kind",
    type=click.Choice(["image", "tensor", "named"]),
    default="image",
    show_default=True,
    help="With --model: image files in, fixed-shape rows of numbers (tabular, signals), or several named tensors "
    "(token ids and a mask, ...; needs --signature).",
)
@click.option(
    "--signature",
    "signature_source",
    default=None,
    metavar="FILE.json|file.py:NAME",
    help="With --model: every input and output by name, datatype and shape, the range of each named dimension and "
    "of each input's values, and what pads a shorter row (README: Any model). Implies --input-kind named.",
)
@click.option(
    "--process",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    metavar="FILE.py",
    help="With --signature: the model's own step, a torch-free file with preprocess(inputs) and/or "
    "postprocess(outputs) (dicts of numpy arrays by name), run by both servers, the embedding and the proof; the "
    "signature's process says what it takes and gives (docs/export.md: A model's own step).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True),
    default=None,
    metavar="tokenizer.json|FOLDER",
    help="With --signature: a text model's Hugging Face tokenizer (the file, or the folder save_pretrained wrote), "
    "shipped in the export and run with `tokenizers` by both servers and the embedding: clients send text "
    "(docs/export.md: Text models).",
)
@click.option(
    "--text-task",
    type=click.Choice(TEXT_TASKS),
    default="classify",
    show_default=True,
    help="With --tokenizer: what the network's first output answers: a label and probabilities, a sentence "
    "embedding, or labelled tokens with their character offsets (labels: --labels, else the model's id2label).",
)
@click.option(
    "--pooling",
    type=click.Choice(POOLINGS),
    default="mean",
    show_default=True,
    help="With --text-task embed: the tokens' vectors averaged over the attention mask, or the first ([CLS]).",
)
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="With --text-task embed: embeddings of unit L2 length.",
)
@click.option(
    "--text-pairs",
    is_flag=True,
    help="With --tokenizer: each row is two texts, `text` and `text_pair`, through the tokenizer's pair template "
    "(entailment, reranking, question answering's context).",
)
@click.option(
    "--truncate/--refuse-long",
    default=True,
    show_default=True,
    help="With --tokenizer: a text longer than the signature's longest sequence is cut to it, or refused (413).",
)
@click.option(
    "--task",
    type=click.Choice(["classify", "regress"]),
    default=None,
    help="With --model: what the outputs are  [default: classify; a tensor model with no --labels and "
    "--output-names regresses]",
)
@click.option(
    "--output-names",
    callback=names,
    default=None,
    metavar="a,b",
    help="With --model --task regress: one name per output value  [default: y, or y0, y1, ...]",
)
@click.option(
    "--input-range",
    callback=value_range,
    default=None,
    metavar="MIN,MAX",
    help="With --model --input-kind tensor: the range training inputs span, where the proof draws rows",
)
@click.option(
    "--labels",
    default=None,
    metavar="FILE|a,b,c",
    help="With --model: class names, one per line in FILE or comma-separated  [default: 0..N-1]",
)
@click.option("--mean", callback=floats, default=None, help="With --model: per-channel mean of pixels in [0, 1].")
@click.option("--std", callback=floats, default=None, help="With --model: per-channel std  [default: 1]")
@click.option(
    "--preprocess",
    type=click.Choice(RECIPES),
    default=None,
    help="With --model: how served images are prepared  [default: resize-crop for RGB, resize for grey]",
)
@click.option(
    "--output-kind",
    type=click.Choice(["logits", "log-probabilities", "probabilities"]),
    default=None,
    help="With --model: what the last layer emits  [default: judged from a forward pass]",
)
@click.option("--dataset", default=None, help="With --model: a torchship dataset (mnist-5k, ...) for the proof.")
@click.option("--name", default=None, help="Model name (a slug)  [default: the preset, or the callable's name]")
@click.option(
    "--version",
    "version",
    default=None,
    metavar="N",
    help="The export's version (a positive integer): /v2/models/NAME/versions/N  [default: one past the "
    "export it replaces in --out, else 1]",
)
@click.option(
    "--calibration",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Images to calibrate int8 on, never held-out ones  [default: the card's dataset's training split, "
    "else synthetic images]",
)
@click.option(
    "--formats",
    callback=format_list,
    default=",".join(DEFAULT_FORMATS),
    show_default=True,
    help=f"Comma-separated: {', '.join(FORMAT_BY_NAME)}.",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Export directory  [default: exports/NAME]"
)
@tolerances
def export_command(
    checkpoint,
    spec,
    weights,
    weights_enum,
    kwargs,
    input_shape,
    input_kind,
    signature_source,
    process,
    tokenizer,
    text_task,
    pooling,
    normalize,
    text_pairs,
    truncate,
    task,
    output_names,
    input_range,
    labels,
    mean,
    std,
    preprocess,
    output_kind,
    dataset,
    name,
    version,
    calibration,
    formats,
    out_dir,
    atol,
    rtol,
    data_dir,
):
    """Export CHECKPOINT (or --model SPEC --weights FILE) to every format, then prove each matches the eager model."""
    # torch only when a command runs: `torchship --help` and a bad option answer in a fraction of a second
    from torchship.export.formats import ExportError, Options, export_checkpoint, export_model, next_version, stamp
    from torchship.export.named_model import named_model, read_signature, tokenizer_file
    from torchship.export.user_model import ModelLoadError, parse_kwargs, read_labels, user_model
    from torchship.train.checkpoint import CheckpointError  # torch too, as the two above

    if (checkpoint is None) == (spec is None):
        raise click.UsageError("give either a torchship CHECKPOINT or --model SPEC --weights FILE")
    user_only = {
        "--weights": weights,
        "--weights-enum": weights_enum,
        "--model-kwarg": kwargs,
        "--input-shape": input_shape,
        "--labels": labels,
        "--mean": mean,
        "--std": std,
        "--preprocess": preprocess,
        "--output-kind": output_kind,
        "--dataset": dataset,
        "--task": task,
        "--output-names": output_names,
        "--input-range": input_range,
        "--signature": signature_source,
        "--process": process,
        "--tokenizer": tokenizer,
    }
    if signature_source is not None or input_kind == "named":
        named_only = {
            k: v
            for k, v in user_only.items()
            if k not in ("--weights", "--model-kwarg", "--signature", "--process", "--tokenizer")
            and not (k == "--labels" and tokenizer)
        }
        if spec is None or weights is None or signature_source is None:
            raise click.UsageError("named inputs need --model SPEC --weights FILE --signature FILE")
        if any(named_only.values()):
            given = [k for k, v in named_only.items() if v]
            raise click.UsageError(f"{', '.join(given)} describe one input; a signature describes every input")
        input_kind = "named"
    preset = None
    if weights_enum is not None and input_kind == "image":
        given = [k for k, v in {"--mean": mean, "--std": std, "--labels": labels}.items() if v]
        if given:
            raise click.UsageError(f"{', '.join(given)}: --weights-enum states them")
        try:
            preset = read(weights_enum)
        except WeightsEnumError as e:
            raise click.BadParameter(str(e), param_hint="--weights-enum") from None
        side = preset.crop or preset.resize
        input_shape = input_shape or ((3, side, side) if side else None)
    if spec is not None and input_kind != "named" and weights is None:
        raise click.UsageError("--model needs --weights FILE")
    if spec is not None and input_kind == "tensor" and input_shape is None:
        raise click.UsageError("--model needs --input-shape (the shape of one row, e.g. 13)")
    if spec is not None and input_kind == "image" and input_shape is not None and len(input_shape) != 3:
        got = ",".join(map(str, input_shape))
        hint = f"an image model's input is C,H,W, got {got} (rows of numbers? add --input-kind tensor)"
        raise click.BadParameter(hint, param_hint="--input-shape")
    if checkpoint is not None and any(user_only.values()):
        given = [k for k, v in user_only.items() if v]
        raise click.UsageError(f"{', '.join(given)} apply to --model; a checkpoint carries its own model card")
    if name is not None and not safe_name(name):
        raise click.BadParameter(f"{name!r} is not a safe name (letters, digits, '_', '-', '.')", param_hint="--name")
    if version is not None and not VERSION_PATTERN.match(version):
        raise click.BadParameter(f"{version!r} is not a version: a positive integer", param_hint="--version")
    progress = lambda m: click.echo(m + " ...", err=True)  # noqa: E731
    text = None
    if tokenizer is not None:
        text = Text(
            task=text_task,
            labels=read_labels(labels, None),
            pooling=pooling,
            normalize=normalize,
            truncate=truncate,
            pairs=text_pairs,
        )
    options = Options(
        data_dir=data_dir, calibration=calibration, process=process, tokenizer=tokenizer and tokenizer_file(tokenizer)
    )
    try:
        if checkpoint is not None:
            progress(f"loading {checkpoint}")
            exported = export_checkpoint(
                checkpoint, out_dir, formats, name=name, version=version, progress=progress, options=options
            )
            source = Path(checkpoint)
        else:
            progress(f"building {spec} and loading {weights}")
            if input_kind == "named":
                model, card = named_model(
                    spec,
                    weights,
                    kwargs=parse_kwargs(kwargs),
                    sig=read_signature(signature_source),
                    name=name,
                    process=process,
                    text=text,
                    tokenizer=tokenizer,
                )
            else:
                model, card = user_model(
                    spec,
                    weights,
                    kwargs=parse_kwargs(kwargs),
                    input_shape=input_shape,
                    labels=labels,
                    mean=mean or (0.0,),
                    std=std or (1.0,),
                    preprocess=preprocess,
                    name=name,
                    output=output_kind,
                    dataset=dataset,
                    input_kind=input_kind,
                    task=task,
                    output_names=output_names,
                    input_range=input_range,
                    preset=preset,
                )
            source = Path(weights)
            out = Path(out_dir or f"exports/{card.name}")
            card = stamp(card, source, version=version or next_version(out, card.name))
            exported = export_model(model, card, out, formats, progress=progress, options=options)
    except (CheckpointError, ModelLoadError, ExportError, CardError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    card = exported.card
    click.echo(f"exported {card.name} version {card.version} to {', '.join(str(p) for p in exported.files.values())}")
    run_proof(exported.directory, atol, rtol, data_dir, source)


@click.command("verify")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="The checkpoint or weights file the export was made from  [default: the path in meta.json]",
)
@tolerances
def verify_command(export_dir, checkpoint, atol, rtol, data_dir):
    """Re-run the equivalence proof (eager vs every exported format) on an export directory."""
    run_proof(export_dir, atol, rtol, data_dir, checkpoint)
