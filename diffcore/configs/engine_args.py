"""Engine options: where and how a pipeline runs (not what it generates)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional

import attrs
import torch

from ..errors import ConfigError
from ..offload import parse_mode
from ..quantization import parse_scheme
from .budget import Budget

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value) -> Optional[torch.dtype]:
    """Accept a torch dtype or its name; None means "use the model's per-component precisions"."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ConfigError(f"unknown dtype {value!r}; accepted: {', '.join(_DTYPES)} or a floating-point torch.dtype")


def parse_weight_files(value) -> Optional[dict]:
    """``{"transformer": "x.gguf", ...}``; a single path means the transformer."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        value = {"transformer": value}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"gguf must be a path (the transformer's file) or a {{component: path}} mapping, got {value!r}")
    return {k: Path(v) for k, v in value.items()}


def _device(inst, attribute, value):
    try:
        torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={value!r} is not a torch device ({exc}); e.g. 'cpu', 'cuda', 'cuda:1'") from None


def _optional_positive_int(inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{attribute.name} must be a positive integer or None, got {value!r}")


def _finite_non_negative(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _optional_str(inst, attribute, value):
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{attribute.name} must be a name (str) or None, got {value!r} ({type(value).__name__})")


def _bool(inst, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, got {value!r}")


def _positive_int(name: str):
    def check(_inst, _attr, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")

    return check


def _variant(inst, attribute, value):
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_]+", value)):
        raise ConfigError(f"variant must be a weight-file variant name such as 'fp16' or 'bf16' (as in "
                          f"diffusion_pytorch_model.fp16.safetensors), got {value!r}")


def _memory_preset(inst, attribute, value):
    from .memory_presets import PRESETS

    if value is not None and value not in PRESETS:
        raise ConfigError(f"unknown memory_preset {value!r}; accepted: {', '.join(PRESETS)}")


@attrs.frozen(kw_only=True)
class EngineArgs:
    """How to run: device, precision override, attention backend, room for speed options, and the size
    budget every request is checked against (``None``: ``DIFFCORE_MAX_*`` or the defaults, see
    ``diffcore.configs.budget``). A plain frozen record of the user's choices: names are resolved (the
    attention backend, the cache policy) by the pipeline, with its plugin registry."""

    device: str = attrs.field(default="cpu", validator=_device)
    dtype: Optional[torch.dtype] = attrs.field(default=None, converter=parse_dtype)
    attention_backend: Optional[str] = attrs.field(default=None, validator=_optional_str)
    compile: bool = False
    cache: Optional[str] = attrs.field(default=None, validator=_optional_str)  # step-cache policy, e.g. "fbcache"
    cache_threshold: float = attrs.field(default=0.1, validator=_finite_non_negative)
    # torchao weight quantization of the transformer(s): see diffcore.quantization.SCHEMES
    quantization: Optional[str] = attrs.field(default=None, converter=parse_scheme)
    # move weights to the device only while they run: "model" (whole components) or "layers" (transformer blocks)
    offload: Optional[str] = attrs.field(default=None, converter=parse_mode)
    # one name for a GPU size's weight placement (quantization + offload): diffcore.configs.memory_presets
    memory_preset: Optional[str] = attrs.field(default=None, validator=_memory_preset)
    # GGUF weight files replacing a component's weights, e.g. {"transformer": "flux1-dev-Q4_K.gguf"}
    gguf: Optional[dict] = attrs.field(default=None, converter=parse_weight_files)
    allow_pickle: bool = attrs.field(default=False, validator=_bool)  # executing pickle: an explicit True only
    # links in the model folder that lead out of it (refused by default: diffcore.loader.containment)
    allow_external_links: bool = attrs.field(default=False, validator=_bool)
    revision: Optional[str] = None
    variant: Optional[str] = attrs.field(default=None, validator=_variant)  # load *.<variant>.safetensors (diffusers)
    num_threads: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    progress: bool = True
    max_pixels: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)  # per frame
    max_frames: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)
    max_steps: Optional[int] = attrs.field(default=None, validator=_optional_positive_int)

    def __attrs_post_init__(self) -> None:
        from .memory_presets import fill

        for name, value in fill(self).items():  # the preset's fields the user left unset
            object.__setattr__(self, name, value)

    def budget(self) -> Budget:
        """The per-request limits (``DIFFCORE_MAX_*`` is read here; the pipeline reads it once, when built)."""
        return Budget.resolve(max_pixels=self.max_pixels, max_frames=self.max_frames, max_steps=self.max_steps)
    # Parallelism inside one generation (launch world_size processes with torchrun; docs/scale.md):
    sp_degree: int = attrs.field(default=1, validator=_positive_int("sp_degree"))  # Ulysses sequence shards
    cfg_parallel: bool = attrs.field(default=False, validator=_bool)  # a rank per CFG branch

    @property
    def world_size(self) -> int:
        """Processes one generation runs on: ``sp_degree x (2 if cfg_parallel else 1)``."""
        return self.sp_degree * (2 if self.cfg_parallel else 1)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineArgs":
        names = [f.name for f in attrs.fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {', '.join(unknown)}; accepted: {', '.join(names)}")
        return cls(**kwargs)
