"""The diffusion extras a request may set: the served model's own SamplingParams fields, with their types.

The server keeps no list of parameter names: a model's SamplingParams subclass decides (a two-expert
model's extra guidance scale is accepted exactly where its class has the field). A name the class does not
have is a 400 naming it, as ``SamplingParams.from_user`` refuses it; a known parameter that does nothing
for one request (e.g. a negative prompt with guidance off) is the engine's to warn about and ignore.
"""
from __future__ import annotations

import json
import math
import types
import typing
from typing import Any

import attrs

from .errors import bad_param

# SamplingParams fields the routes set themselves: from `prompt`, `size`, the uploads and the response.
ROUTE_OWNED = ("prompt", "image", "height", "width", "output_type")
KINDS = (bool, int, float, str, list, dict)


def _kind(hint: Any) -> type | None:
    """bool / int / float / str / list / dict for a field's type, or None when it is none of them (passed as is)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = set()
    for arg in args:
        arg = typing.get_origin(arg) or arg
        if arg is not type(None) and arg in KINDS:
            found.add(arg)
    for kind in KINDS:  # "str | list[str]" is a string as far as a form goes; "int | float" a number
        if kind in found and (kind is not int or float not in found):
            return kind
    return float if float in found else None


def _hints(params_cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(params_cls)
    except Exception:  # an annotation that does not resolve: convert nothing, the engine validates
        return {}


def extra_kinds(params_cls) -> dict[str, type | None]:
    """{field name: kind} for every SamplingParams field a request may set at the top level."""
    hints = _hints(params_cls)
    return {f.name: _kind(hints.get(f.name, f.type)) for f in attrs.fields(params_cls) if f.name not in ROUTE_OWNED}


def convert(name: str, value: Any, kind: type | None, form: bool) -> Any:
    """Form fields are strings: made the field's type here (naming the field when that fails). JSON values keep
    their types (the engine refuses a wrong one, naming the field); a non-finite number is refused either way."""
    if form and isinstance(value, str) and kind is not None and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif kind in (list, dict):
                value = json.loads(text)
            else:
                value = kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number", bool: "true or false", list: "a JSON list",
                    dict: "a JSON object"}[kind]
            raise bad_param(name, f"{name} must be {what}, got {value!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_param(name, f"{name} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, float) and not math.isfinite(item):
                raise bad_param(name, f"every value in {name} must be a finite number, got {item!r}")
    return value


def diffusion_extras(body: dict, params_cls, form: bool) -> dict:
    """The model's parameters present in ``body``, converted where the body is a form."""
    kinds = extra_kinds(params_cls)
    return {name: convert(name, body[name], kind, form) for name, kind in kinds.items() if body.get(name) is not None}
