"""The diffusion extras a request may set: the served model's own SamplingParams fields, with their types.

The server keeps no list of parameter names: a model's SamplingParams subclass decides (a two-expert
model's extra guidance scale is accepted exactly where its class has the field). A name the class does not
have is a 400 naming it, as ``SamplingParams.from_user`` refuses it; a known parameter that does nothing
for one request (e.g. a negative prompt with guidance off) is the engine's to warn about and ignore.

Only fields whose type is JSON (bool, int, float, str, lists and dicts of those, None) are request
parameters: a field typed ``Any``, ``Path`` or an image class, or checked as an image, could make a
client's string a server file path (and skip the upload limits), so it is never taken from a request.
A plugin opts a field of another type in with ``attrs.field(metadata={REQUEST_KIND: float})``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
import types
import typing
from typing import Any, Optional

import attrs

from ..configs.sampling_params import image_validator
from .errors import bad_param

log = logging.getLogger("diffcore.serve")

# SamplingParams fields the routes set themselves: from `prompt`, `size`, the uploads and the response.
ROUTE_OWNED = ("prompt", "image", "height", "width", "output_type")
KINDS = (bool, int, float, str, list, dict)
REQUEST_KIND = "diffcore.request_kind"  # attrs field metadata: a non-JSON-typed field's kind in a request


def _json_kinds(hint: Any) -> Optional[set]:
    """The JSON kinds a type is made of, or None when any part of it is not JSON (Any, Path, a class...)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    found = set()
    for arg in typing.get_args(hint) if union else (hint,):
        origin = typing.get_origin(arg)
        if arg is type(None):
            continue
        if origin is typing.Literal:
            values = typing.get_args(arg)
            if not all(type(v) in KINDS for v in values):
                return None
            found.update(type(v) for v in values)
            continue
        base = origin or arg
        if base not in KINDS or any(_json_kinds(a) is None for a in typing.get_args(arg)):  # list[Path]: not JSON
            return None
        found.add(base)
    return found or None


def _kind(hint: Any) -> Optional[type]:
    """bool / int / float / str / list / dict for a field's type; None when the type is not JSON."""
    found = _json_kinds(hint)
    if not found:
        return None
    for kind in KINDS:  # "str | list[str]" is a string as far as a form goes; "int | float" a number
        if kind in found and (kind is not int or float not in found):
            return kind
    return float


def _hints(params_cls) -> dict[str, Any]:
    """Every field's resolved annotation. Where the class's annotations do not all resolve, each field is
    resolved on its own; one that still does not is left out (not a request parameter), with a warning."""
    try:
        return typing.get_type_hints(params_cls)
    except Exception:
        pass
    hints = {}
    for f in attrs.fields(params_cls):
        owner = next((k for k in params_cls.__mro__ if f.name in vars(k).get("__annotations__", {})), params_cls)
        hint = vars(owner).get("__annotations__", {}).get(f.name, f.type)
        try:
            module = vars(sys.modules[owner.__module__]) if owner.__module__ in sys.modules else {}
            hints[f.name] = eval(hint, dict(module), dict(vars(owner))) if isinstance(hint, str) else hint
        except Exception as exc:
            log.warning("%s.%s: its type %r does not resolve (%s: %s); the server does not take it from requests",
                        params_cls.__name__, f.name, hint, type(exc).__name__, exc)
    return hints


def _takes_image(field) -> bool:
    check = field.validator
    return check is image_validator or image_validator in getattr(check, "_validators", ())


@functools.lru_cache(maxsize=None)
def extra_kinds(params_cls) -> dict[str, type]:
    """{field name: kind} for every SamplingParams field a request may set at the top level."""
    hints = _hints(params_cls)
    kinds = {}
    for f in attrs.fields(params_cls):
        if f.name in ROUTE_OWNED or f.name.startswith("_") or _takes_image(f):
            continue
        kind = f.metadata.get(REQUEST_KIND) or (_kind(hints[f.name]) if f.name in hints else None)
        if kind in KINDS:
            kinds[f.name] = kind
    return kinds


def convert(name: str, value: Any, kind: type, form: bool) -> Any:
    """Form fields are strings: made the field's type here (naming the field when that fails). JSON values keep
    their types (the engine refuses a wrong one, naming the field); a non-finite number is refused either way."""
    if form and isinstance(value, str) and kind is not str:
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
