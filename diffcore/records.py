"""Typed records that plugins return from their registration hooks.

Classes may be given as import strings (``"pkg.module:Name"``) so a plugin's entry-point module
stays importable without torch; the registry resolves them on first use.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import attrs

from .errors import PluginError


def resolve_ref(ref: Any) -> Any:
    """Import ``"pkg.module:Attr"`` (or return ``ref`` unchanged if it is already an object)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    if not attr:
        raise PluginError(f"bad reference {ref!r}: expected 'package.module:Name'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"cannot import {ref!r}: {exc}") from exc
    return obj


def _tuple(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value or ())


@attrs.frozen
class PipelineRegistration:
    """A ComposedPipelineBase subclass serving the Diffusers ``_class_name`` ``name``."""

    name: str
    cls: Any
    description: str = ""


@attrs.frozen
class CompositionRegistration:
    """Another stage composition for the pipeline ``pipeline_name`` serves (a task: ``"img2img"``,
    ``"inpaint"``): built on the components that pipeline loaded, chosen per request by what it carries
    (``diffcore.tasks``). ``name`` is conventionally the Diffusers class it reproduces."""

    name: str
    pipeline_name: str
    task: str
    cls: Any
    description: str = ""


@attrs.frozen
class ConfigRegistration:
    """Which PipelineConfig + SamplingParams serve which models.

    A model matches by Hugging Face id (``hf_ids``), by alias, or by ``detector(model_index, folder)``
    returning True. ``default_for_pipeline`` marks the fallback for a pipeline class when nothing
    more specific matches. ``source`` (an import string returning a local folder, or a hub id) says
    where an alias's weights live.
    """

    name: str
    pipeline_name: str
    pipeline_config: Any
    sampling_params: Any
    hf_ids: tuple = attrs.field(default=(), converter=_tuple)
    aliases: tuple = attrs.field(default=(), converter=_tuple)
    detector: Optional[Callable[..., bool]] = None
    default_for_pipeline: bool = False
    source: Any = None


@attrs.frozen
class ModuleRegistration:
    """A model class (transformer, VAE) keyed by the Diffusers class name in model_index.json."""

    name: str
    cls: Any
    library: str = "diffusers"


@attrs.frozen
class SchedulerRegistration:
    name: str
    cls: Any


@attrs.frozen
class StageRegistration:
    name: str
    cls: Any


@attrs.frozen
class AttentionBackendRegistration:
    """``fn(query, key, value, attn_mask=None, scale=None)`` over (B, S, H, D) tensors."""

    name: str
    fn: Any


@attrs.frozen
class CachePolicyRegistration:
    """A step-cache policy class, selected with ``EngineArgs(cache=name)``."""

    name: str
    cls: Any


@attrs.frozen
class LoraFormatRegistration:
    """A community LoRA layout for the denoiser classes ``modules`` (Diffusers class names).

    ``detect(keys) -> bool`` recognises a file by its tensor names; ``convert(state_dict) -> state_dict``
    renames (and splits fused projections) into the diffusers / PEFT layout that
    ``diffcore.lora.adapter`` reads. Both may be import strings.
    """

    name: str
    modules: tuple = attrs.field(converter=_tuple)
    detect: Any
    convert: Any
    description: str = ""


@attrs.frozen
class Registered:
    """A record stamped with the plugin and distribution that supplied it."""

    record: Any
    plugin: str
    distribution: Optional[str]
    version: Optional[str]

    def describe(self) -> str:
        return f"plugin {self.plugin!r} (distribution {self.distribution or 'unknown'} {self.version or ''})".replace(" )", ")")
