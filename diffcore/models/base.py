"""Base class for Diffusers-format model modules (transformers, VAEs).

A module is built from its ``config.json`` on the meta device and its weights are then assigned
from safetensors by the loader; this class only knows how to turn a config dict into constructor
arguments and remembers the config it was built with.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def _repair_device_context() -> None:
    """Make ``with torch.device(...)`` cover ``torch.linspace`` again.

    transformers 5 swaps ``torch.linspace`` for a wrapper while it builds a model on the meta device.
    torch caches the set of factory functions a device context redirects on first use; if that first
    use falls inside transformers' window (loading a text encoder before any diffcore module), the
    cache holds the wrapper and, for the rest of the process, ``torch.linspace`` ignores the context.
    """
    try:
        from torch.utils._device import _device_constructors
    except ImportError:  # private torch API; without it there is nothing to repair
        return
    if torch.linspace not in _device_constructors():
        _device_constructors.cache_clear()


class ModelMixin(nn.Module):
    """Mixin for diffcore model modules whose parameter names equal the Diffusers class of the same name.

    Subclasses set ``diffusers_class_name`` (the ``_class_name`` in config.json they serve) and may
    override ``map_state_dict_key`` to rename checkpoint keys on load. ``checkpoint_layouts`` lists the
    key layouts the class reads besides its own (:class:`~diffcore.loader.key_layouts.CheckpointLayout`,
    e.g. a family's original single-file layout); its first entry may describe the Diffusers names
    themselves (``convert=None``), so a file can be recognised as this model's.
    """

    diffusers_class_name: ClassVar[str] = ""
    checkpoint_layouts: ClassVar[tuple] = ()
    config: dict

    @classmethod
    def init_arg_names(cls) -> set[str]:
        return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")}

    @classmethod
    def filter_config(cls, config: Mapping[str, Any]) -> dict:
        """Keep the keys ``__init__`` accepts; warn about the others (Diffusers' behaviour, made visible)."""
        accepted = cls.init_arg_names()
        kwargs, ignored = {}, []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in accepted:
                kwargs[key] = tuple(value) if isinstance(value, list) and key.endswith(("dims_rope", "types", "channels", "mult", "downsample", "scales", "size")) else value
            else:
                ignored.append(key)
        if ignored:
            log.info("%s ignores config keys %s", cls.__name__, ", ".join(sorted(ignored)))
        return kwargs

    @classmethod
    def from_config(cls, config: Mapping[str, Any], device: torch.device | str | None = None, source: Any = None):
        """Build the module from a config dict (``device="meta"`` builds without allocating weights).

        A value of the wrong type, or one the constructor rejects, is a ConfigFileError naming ``source``
        (the config file) and the field."""
        from ..loader.config_types import build, check_config

        kwargs = cls.filter_config(config)
        source = source if source is not None else f"the {cls.__name__} config"
        check_config(cls.__init__, kwargs, source)

        def make():
            if device is None:
                return cls(**kwargs)
            _repair_device_context()
            with torch.device(device):
                return cls(**kwargs)

        model = build(make, cls, source)
        model.config = {**{k: v for k, v in config.items() if not k.startswith("_")}, **kwargs}
        return model

    @classmethod
    def map_state_dict_key(cls, key: str) -> str:
        """Rename one checkpoint key to this module's parameter name (identity by default)."""
        return key

    @classmethod
    def variant_of_config(cls, config: Mapping[str, Any]) -> Optional[str]:
        """Which variant of the model a config describes, in words (e.g. "FLUX.2 [klein] 4B (hidden 3072, ...)"),
        or None (the default: the class names no variants). With ``variant_of_weights`` it turns a weight file
        of another variant into a ``CheckpointVariantError`` naming both."""
        return None

    @classmethod
    def variant_of_weights(cls, shapes: Mapping[str, tuple]) -> Optional[str]:
        """Which variant a weight file is, from its tensor shapes (module names -> shape), in the words of
        ``variant_of_config``; None when the shapes do not say."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating-point parameter outside ``_keep_in_fp32_modules`` (as in diffusers)."""
        keep = getattr(self, "_keep_in_fp32_modules", None) or ()
        first = None
        for name, p in self.named_parameters():
            if not p.is_floating_point():  # packed quantized weights (GGUF) are not the compute dtype
                continue
            first = first or p.dtype
            if not any(m in name.split(".") for m in keep):
                return p.dtype
        return first or torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


class DiagonalGaussianDistribution:
    """The VAE posterior: ``mean`` and ``logvar`` split from the encoder's moments (as diffusers does)."""

    def __init__(self, parameters: torch.Tensor, dim: int = 1):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=dim)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise
