"""Engine choices that modules read at call time, carried by context variables.

Modules deep inside a forward (the attention dispatch, a parallel group, the active LoRA set) need
to know engine choices without a process-wide global. The pipeline owns an ``EngineContext``: the
values of some ``contextvars.ContextVar``s, set around each forward and reset afterwards. Context
variables are per thread (and per asyncio task), so concurrent requests on one pipeline, and two
pipelines with different choices in one process, never see each other's values.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator


class EngineContext:
    """The context-variable values a pipeline's forward runs under."""

    def __init__(self):
        self._values: dict[contextvars.ContextVar, Any] = {}

    def set(self, var: contextvars.ContextVar, value: Any) -> None:
        """Run every later forward with ``var`` set to ``value`` (build time only)."""
        self._values[var] = value

    def get(self, var: contextvars.ContextVar, default: Any = None) -> Any:
        return self._values.get(var, default)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Set the variables for the enclosed code; restore the caller's values afterwards."""
        tokens = [(var, var.set(value)) for var, value in self._values.items()]
        try:
            yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    def __repr__(self) -> str:
        return "EngineContext(" + ", ".join(f"{v.name}={x!r}" for v, x in self._values.items()) + ")"
