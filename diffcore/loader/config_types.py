"""Type checks of a checkpoint's config file against the constructor it feeds.

Why: a hand-edited or foreign ``config.json`` / ``scheduler_config.json`` with ``"num_layers": "2"`` or
``"shift": null`` otherwise fails as a raw TypeError deep inside a module constructor or a scheduler,
with no file or field named. Each value is checked against the constructor parameter's default (an
``int`` default wants an int, a ``float`` default a finite number, a tuple default a list, ...) or,
where the default is ``None``, against the basic types its annotation names; then any exception the
constructor still raises is reported against the file.
"""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigFileError


def _error(file, field, reason: str) -> ConfigFileError:
    where = f"{file}, field {field!r}" if field is not None else str(file)
    return ConfigFileError(f"{where}: {reason}", file=file, field=field)

_NAMES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple),
          "tuple": (list, tuple), "Sequence": (list, tuple), "dict": (dict,), "Mapping": (dict,)}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _expected_from_default(default: Any) -> tuple[str, tuple[type, ...]] | None:
    if isinstance(default, bool):
        return "true or false", (bool,)
    if isinstance(default, int):
        return "an integer", (int,)
    if isinstance(default, float):
        return "a number", (int, float)
    if isinstance(default, str):
        return "a string", (str,)
    if isinstance(default, (list, tuple)):
        return "a list", (list, tuple)
    if isinstance(default, dict):
        return "an object", (dict,)
    return None


def _expected_from_annotation(annotation: Any) -> tuple[str, tuple[type, ...]] | None:
    """``Optional[int]``, ``int | None``, ``Sequence[int]``...: the outer basic types, or None if unknown."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    outer = re.sub(r"\[.*\]", "", text)  # Tuple[int, ...] -> Tuple: element types are not checked here
    names = [n for n in re.split(r"[\s|,()]+|Optional|Union", outer) if n and n != "None"]
    if not names or any(n not in _NAMES for n in names):
        return None
    types = tuple(t for n in names for t in _NAMES[n])
    return " or ".join(names) + " or null", types + (type(None),)


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number
    if not isinstance(value, types):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def check_config(init: Callable, config: Mapping[str, Any], file: Path | str) -> None:
    """Raise ConfigFileError(file, field) for the first value ``init`` would get with the wrong type."""
    for name, param in inspect.signature(init).parameters.items():
        if name not in config or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = config[name]
        if param.default is not inspect.Parameter.empty and param.default is not None:
            expected = _expected_from_default(param.default)
        elif param.annotation is not inspect.Parameter.empty:
            expected = _expected_from_annotation(param.annotation)
        else:
            expected = None
        if value is None:  # null: refused only where the annotation plainly excludes it
            text = param.annotation if isinstance(param.annotation, str) else str(param.annotation)
            if expected is not None and param.annotation is not inspect.Parameter.empty \
                    and "None" not in text and "Optional" not in text and "Any" not in text:
                raise _error(file, name, f"expected {expected[0]}, got null")
            continue
        if expected is not None and not _fits(value, expected[1]):
            raise _error(file, name, f"expected {expected[0]}, got {_describe(value)}")


def build(factory: Callable[[], Any], cls: type, file: Path | str) -> Any:
    """``factory()``, with an exception from inside the constructor reported against ``file``."""
    try:
        return factory()
    except ConfigFileError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, AssertionError, IndexError, KeyError, AttributeError,
            OverflowError, RuntimeError) as exc:
        raise _error(file, None, f"its values cannot build {cls.__name__}: {type(exc).__name__}: {exc}. "
                     "Check the file against the model's original config") from exc
