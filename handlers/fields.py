"""Reading a card's JSON fields: the error that names the field at fault, and the readers every part of the card
(the card itself, its signature) shares; stdlib only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields


class CardError(ValueError):
    """A card that does not validate; the message names the field and what is wrong with it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"model card field '{field_name}': {message}")


def sequence(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise CardError(name, f"expected a list, got {value!r}"[:200])
    return tuple(value)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def sub(cls, name: str, value):
    if not isinstance(value, Mapping):
        raise CardError(name, f"expected an object, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CardError(f"{name}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**value)
    except TypeError as e:
        raise CardError(name, str(e)) from None
