"""PipelineStage: one reusable step with a declared contract.

A stage declares the Request fields it reads (``inputs``) and writes (``outputs``). The pipeline
proves at build time that every required input is produced before the stage runs; at run time
``verify_input`` / ``verify_output`` check presence and type and raise StageVerificationError.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import attrs

from ..errors import StageVerificationError
from ..request import Request


@attrs.frozen
class StageField:
    name: str
    type: Any = object
    required: bool = True


def In(name: str, type: Any = object, required: bool = True) -> StageField:
    return StageField(name, type, required)


Out = In


class PipelineStage:
    """Base class. Subclasses set ``inputs`` / ``outputs`` (class or instance level) and ``forward``."""

    inputs: tuple[StageField, ...] = ()
    outputs: tuple[StageField, ...] = ()
    consumes: tuple[str, ...] = ()  # fields the stage clears (later stages cannot read them)
    # How the stage takes part in a batch of requests (diffcore.engine.rows): "rows" (once over the merged
    # rows), "each" (per request; outputs merged) or None (unknown: the pipeline runs requests one by one).
    batch: Optional[str] = None

    def __init__(self, name: Optional[str] = None):
        # Stage names belong to the pipeline (``add_stage`` sets it); ``name`` only labels a stage run alone.
        self.name = name or type(self).__name__

    def forward(self, req: Request) -> Request:
        raise NotImplementedError

    def _check(self, req: Request, fields: tuple[StageField, ...], when: str) -> None:
        for f in fields:
            value = getattr(req, f.name, None)
            if value is None:
                if f.required:
                    raise StageVerificationError(self.name, f.name, f"required {when} but missing")
                continue
            if f.type is not object and not isinstance(value, f.type):
                raise StageVerificationError(
                    self.name, f.name, f"expected {getattr(f.type, '__name__', f.type)}, got {type(value).__name__}"
                )

    def verify_input(self, req: Request) -> None:
        self._check(req, self.inputs, "as input")

    def verify_output(self, req: Request) -> None:
        self._check(req, self.outputs, "as output")

    def __call__(self, req: Request) -> Request:
        self.verify_input(req)
        start = time.perf_counter()
        req = self.forward(req)
        req.timings[self.name] = req.timings.get(self.name, 0.0) + time.perf_counter() - start
        self.verify_output(req)
        return req

    def __repr__(self) -> str:
        ins = ", ".join(f.name + ("" if f.required else "?") for f in self.inputs)
        outs = ", ".join(f.name for f in self.outputs)
        return f"{self.name}({ins} -> {outs})"
