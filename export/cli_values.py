"""What the export command's options parse (numbers, shapes, names, ranges, a list of formats): click callbacks,
each a one-line usage error naming what it expected."""

from __future__ import annotations

import click

from torchship.handlers.formats import FORMAT_BY_NAME


def floats(_ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"one number or one per channel, comma-separated; got {value!r}") from None


def shape(_ctx, _param, value: str | None):
    """C,H,W for an image model; one example's shape for a tensor one (13, or 3,128): checked against the kind below."""
    if value is None:
        return None
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        dims = ()
    if not 1 <= len(dims) <= 4 or min(dims) < 1:
        raise click.BadParameter(
            f"comma-separated positive integers: C,H,W for images (3,224,224), one example's "
            f"shape for tensors (13); got {value!r}"
        )
    return dims


def names(_ctx, _param, value: str | None):
    if value is None:
        return None
    found = tuple(v.strip() for v in value.split(",") if v.strip())
    if not found:
        raise click.BadParameter(f"comma-separated names, e.g. y or price,volume; got {value!r}")
    return found


def value_range(_ctx, _param, value: str | None):
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"MIN,MAX, e.g. 0,1; got {value!r}") from None
    if not low < high:
        raise click.BadParameter(f"MIN must be below MAX; got {value!r}")
    return low, high


def format_list(_ctx, _param, value: str):
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FORMAT_BY_NAME]
    if unknown or not names:
        raise click.BadParameter(f"choose from {', '.join(FORMAT_BY_NAME)}; got {value!r}")
    return tuple(dict.fromkeys(names))
