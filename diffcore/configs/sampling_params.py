"""Per-request sampling parameters: typed, validated, with per-model defaults in subclasses."""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Optional

import attrs

from ..errors import SamplingParamError
from .. import ignored
from . import ranges

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _positive_int(inst, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamError(attribute.name, f"expected a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise SamplingParamError(attribute.name, f"must be a positive integer, got {value}")


def _non_negative_float(inst, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamError(attribute.name, f"expected a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise SamplingParamError(attribute.name, f"must be a finite number, got {value}")
    if value < 0:
        raise SamplingParamError(attribute.name, f"must be >= 0, got {value}")


def _flow_shift(inst, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SamplingParamError(attribute.name, f"must be a finite number > 0, got {value!r}")
    problem = ranges.shift_problem(value)
    if problem:
        raise SamplingParamError(attribute.name, problem)


def _fps(inst, attribute, value):
    _positive_int(inst, attribute, value)
    problem = None if value is None else ranges.frame_rate_problem(value)
    if problem:
        raise SamplingParamError(attribute.name, problem)


def _guidance(inst, attribute, value):
    _non_negative_float(inst, attribute, value)
    problem = None if value is None else ranges.guidance_problem(value)
    if problem:
        raise SamplingParamError(attribute.name, problem)


def _timesteps(inst, attribute, value):
    """Few-step models: a non-empty, strictly decreasing list of finite timesteps in [0, 1000]."""
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise SamplingParamError(attribute.name, f"expected a non-empty list of timesteps in [0, 1000], got {value!r}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1000:
            raise SamplingParamError(attribute.name, f"every timestep must be a finite number in [0, 1000], got {t!r}")
    if any(b >= a for a, b in zip(value, value[1:])):
        raise SamplingParamError(attribute.name, f"timesteps must be strictly decreasing (noisy to clean), got {list(value)}")


def _check_finite(name: str, value) -> None:
    """Every float parameter, of any model (subclass fields without validators too), must be finite:
    NaN compares false with everything, so it would silently turn CFG off or give an all-NaN picture."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SamplingParamError(name, f"must be a finite number, got {value}")


_SCALE = re.compile(r"(^|_)scale(_\d+)?$")  # guidance_scale, true_cfg_scale, guidance_scale_2, stg_scale, ...


def _check_scale(name: str, value) -> None:
    """Every model's guidance-like scales (a field named ``*_scale``, a plugin's own too: LTX-2's stg_scale,
    audio_guidance_scale) get the guidance range: 1e308 overflowed to a black picture."""
    if _SCALE.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = ranges.guidance_problem(value)
        if problem:
            raise SamplingParamError(name, problem)


@functools.lru_cache(maxsize=None)
def _inherited_validators(cls) -> dict:
    """``{field: validator}``: for each field, the validator of the nearest class in ``cls``'s MRO that gave it one."""
    found: dict = {}
    for klass in cls.__mro__:
        if attrs.has(klass):
            for field in attrs.fields(klass):
                if field.validator is not None:
                    found.setdefault(field.name, field.validator)
    return found


def _prompt(inst, attribute, value):
    if value is None:
        return
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise SamplingParamError(attribute.name, f"expected a string or a non-empty list of strings, got {value!r}")
    for i, text in enumerate(items):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates (e.g. half of an emoji from a bad decode)
            where = f"{attribute.name}[{i}]" if not isinstance(value, str) else attribute.name
            raise SamplingParamError(attribute.name, f"{where} is not valid Unicode text: {text[exc.start]!r} at "
                                     f"position {exc.start} is a lone surrogate; no tokenizer can encode it "
                                     "(decode the text with errors='replace', or remove it)") from None


def _seed(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamError("seed", f"expected an integer, got {value!r} ({type(value).__name__})")
    if not 0 <= value < 2**63:
        raise SamplingParamError("seed", f"must be in [0, 2**63), got {value}")


def _output_type(inst, attribute, value):
    if value not in OUTPUT_TYPES:
        raise SamplingParamError("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {value!r}")


def _loras(inst, attribute, value):
    if value is None:
        return
    if not isinstance(value, dict):
        raise SamplingParamError("loras", f"expected a dict {{adapter name: weight}}, got {value!r}")
    for name, weight in value.items():
        if not isinstance(name, str):
            raise SamplingParamError("loras", f"adapter names are strings, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise SamplingParamError("loras", f"the weight of adapter {name!r} must be a finite number, got {weight!r}")


def _image(inst, attribute, value):
    if value is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not (isinstance(item, (str, Path)) or hasattr(item, "convert") or hasattr(item, "shape")):
            raise SamplingParamError("image", f"expected a PIL image, a path or an array, got {type(item).__name__}")


@attrs.define(kw_only=True)
class SamplingParams:
    """What one ``generate()`` call may set. Subclasses override the defaults with the model's own.

    ``None`` means "not set"; InputValidationStage resolves what the model needs (e.g. a default size).
    """

    prompt: Optional[str | list[str]] = attrs.field(default=None, validator=_prompt)
    negative_prompt: Optional[str | list[str]] = attrs.field(default=None, validator=_prompt)
    image: Any = attrs.field(default=None, validator=_image)
    height: Optional[int] = attrs.field(default=None, validator=_positive_int)
    width: Optional[int] = attrs.field(default=None, validator=_positive_int)
    num_frames: Optional[int] = attrs.field(default=None, validator=_positive_int)
    fps: Optional[int] = attrs.field(default=None, validator=_fps)
    num_inference_steps: int = attrs.field(default=50, validator=_positive_int)
    guidance_scale: float = attrs.field(default=1.0, validator=_guidance)  # sane ranges: configs/ranges.py
    true_cfg_scale: float = attrs.field(default=1.0, validator=_guidance)
    max_sequence_length: int = attrs.field(default=512, validator=_positive_int)
    seed: int = attrs.field(default=0, validator=_seed)
    # Few-step (DMD) models: the timesteps to sample at, instead of the checkpoint's distilled list.
    timesteps: Optional[list] = attrs.field(default=None, validator=_timesteps)
    flow_shift: Optional[float] = attrs.field(default=None, validator=_flow_shift)
    output_type: str = attrs.field(default="pil", validator=_output_type)
    loras: Optional[dict] = attrs.field(default=None, validator=_loras)  # {adapter name: weight}; None: base model

    # The names the caller set (from_user), for the ignored-parameter rule (diffcore.ignored).
    _given: tuple = attrs.field(default=(), init=False, repr=False, eq=False)

    # Not user parameters: limits the model sets for validation.
    max_sequence_length_limit: ClassVar[Optional[int]] = None
    max_images: ClassVar[int] = 0  # 0: the model takes no input image
    min_images: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        # A subclass overriding a default with a plain ``height: int = 1024`` replaces the whole attrs
        # field and drops its validator; re-apply the nearest ancestor's validator (the base's, or a plugin
        # class's own: Wan 2.2's guidance_scale_2) so every model's params validate.
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            check = _inherited_validators(type(self)).get(field.name)
            if check is not None and field.validator is None:
                check(self, field, value)
            _check_finite(field.name, value)
            _check_scale(field.name, value)

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in attrs.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_user(cls, **kwargs: Any) -> "SamplingParams":
        """Build from user keywords: ``None`` keeps the default, an unknown name is an error."""
        names = cls.parameter_names()
        for key in kwargs:
            if key not in names:
                raise SamplingParamError(key, f"unknown parameter; accepted: {', '.join(names)}")
        params = cls(**{k: v for k, v in kwargs.items() if v is not None})
        params.check_limits()
        params._given = tuple(k for k, v in kwargs.items() if v is not None)
        return params

    def __getattribute__(self, name: str):
        if name[0] != "_":
            ignored.record(name)
        return object.__getattribute__(self, name)

    def check_limits(self) -> None:
        if self.prompt is None:
            raise SamplingParamError("prompt", "a prompt is required (a string or a list of strings)")
        limit = self.max_sequence_length_limit
        if limit is not None and self.max_sequence_length > limit:
            raise SamplingParamError("max_sequence_length", f"this model accepts at most {limit}, got {self.max_sequence_length}")
        n_images = len(self.images)
        if n_images < self.min_images:
            raise SamplingParamError("image", f"this model needs at least {self.min_images} input image(s); pass image=...")
        if n_images > self.max_images:
            accepted = "no input image" if self.max_images == 0 else f"at most {self.max_images} input image(s)"
            raise SamplingParamError("image", f"this model takes {accepted}, got {n_images}")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def images(self) -> list[Any]:
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]

    def negative_prompts(self, batch_size: int, default: Optional[str] = None) -> Optional[list[str]]:
        """Negative prompts broadcast to the batch, or None when none was given and the model has no default."""
        neg = self.negative_prompt if self.negative_prompt is not None else default
        if neg is None:
            return None
        negs = [neg] * batch_size if isinstance(neg, str) else list(neg)
        if len(negs) != batch_size:
            raise SamplingParamError("negative_prompt", f"got {len(negs)} negative prompts for {batch_size} prompts")
        return negs


non_negative_float = _non_negative_float  # for plugins' own parameters
guidance = _guidance  # for plugins' own guidance scales (a float in [0, ranges.MAX_GUIDANCE])
image_validator = _image  # for plugins' own image inputs (the server never takes such a field from a request)

_BASE_VALIDATORS = {f.name: f.validator for f in attrs.fields(SamplingParams) if f.validator is not None}
