"""The size budget of one request: absurd sizes and step counts are refused before anything is allocated.

Why: ``height=10**6`` or ``num_inference_steps=10**9`` would otherwise end minutes later in a
MemoryError or an OverflowError deep inside a model. The defaults allow every real model's sizes with
room to spare (4096 x 4096 pixels per frame, 257 frames, 1000 steps: more than 81-frame 720p video or
2048 x 2048 images need); raise them per engine (``EngineArgs(max_pixels=...)``) or per process
(``DIFFCORE_MAX_PIXELS``, ``DIFFCORE_MAX_FRAMES``, ``DIFFCORE_MAX_STEPS``).

The engine's budget (read from EngineArgs and the environment when the pipeline is built) is carried
by a context variable that the pipeline sets around each forward, so InputValidationStage checks the
resolved size (after model defaults and rounding) without any process-wide state; outside a
pipeline's forward the environment / default budget applies.
"""
from __future__ import annotations

import contextvars
import os
from typing import Optional

import attrs

from ..errors import ConfigError, SamplingParamError

DEFAULTS = {"max_pixels": 4096 * 4096, "max_frames": 257, "max_steps": 1000}
ENV = {"max_pixels": "DIFFCORE_MAX_PIXELS", "max_frames": "DIFFCORE_MAX_FRAMES", "max_steps": "DIFFCORE_MAX_STEPS"}


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _from_env(name: str) -> int:
    raw = os.environ.get(ENV[name])
    if raw is None or not raw.strip():
        return DEFAULTS[name]
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise ConfigError(f"{ENV[name]}={raw!r}: expected a positive integer (the {name} budget; default {DEFAULTS[name]})")
    return value


@attrs.frozen(kw_only=True)
class Budget:
    """Per-request limits: pixels per frame (height x width), frames, denoising steps."""

    max_pixels: int = attrs.field(factory=lambda: _from_env("max_pixels"))
    max_frames: int = attrs.field(factory=lambda: _from_env("max_frames"))
    max_steps: int = attrs.field(factory=lambda: _from_env("max_steps"))

    def __attrs_post_init__(self) -> None:
        for name in DEFAULTS:
            positive_int(name, getattr(self, name))

    @classmethod
    def resolve(cls, **values: Optional[int]) -> "Budget":
        """A budget from explicit values; ``None`` takes the environment / default one."""
        return cls(**{k: v for k, v in values.items() if v is not None})

    def _refuse(self, param: str, what: str, name: str) -> None:
        raise SamplingParamError(param, f"{what} is over this engine's budget of {getattr(self, name):,} ({name}); "
                                 f"raise it with EngineArgs {name}=... or {ENV[name]} if this is really wanted")

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps:
            self._refuse("num_inference_steps", f"{steps:,} steps", "max_steps")

    def check_size(self, height: int, width: int, num_frames: Optional[int] = None) -> None:
        pixels = height * width
        if pixels > self.max_pixels:
            self._refuse("height" if height >= width else "width", f"{height} x {width} = {pixels:,} pixels per frame",
                         "max_pixels")
        if num_frames is not None and num_frames > self.max_frames:
            self._refuse("num_frames", f"{num_frames:,} frames", "max_frames")


CURRENT: contextvars.ContextVar[Optional[Budget]] = contextvars.ContextVar("diffcore_budget", default=None)


def current() -> Budget:
    """The budget of the forward in progress, else the environment / default one."""
    budget = CURRENT.get()
    return budget if budget is not None else Budget()
