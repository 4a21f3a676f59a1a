"""``DiffGenerator.from_pretrained`` in named steps, each testable alone. In order:

1. ``resolve_source``: the model (alias, folder or Hub id) -> its folder, model_index.json, pipeline class,
   config registration, ``PipelineConfig`` and ``SamplingParams`` class.
2. ``check_engine``: the engine choices against that model, before any weights are read (required
   components, quantization on this device, GGUF component names, attention backend, cache policy).
3. ``parallel_layout``: the sequence/CFG layout checked against the model; this rank's device.
4. ``choose_precision``: the dtype of each component and the device the weights load on.
5. ``load_components``: every component built and its weights loaded (quantized while streaming if asked).
6. ``place_weights``: quantization finished; offload hooks attached.

Everything a step needs arrives as an argument: the plugin registry is the caller's, EngineArgs is never
changed (a step that refines it returns a new record).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from .. import offload, parallel, precision
from ..configs.engine_args import EngineArgs
from ..errors import ConfigError
from ..quantization import LayerQuantizer, check_supported, quantize_model
from ..records import resolve_ref
from .components import load_component
from .model_index import ModelIndex, read_model_index, resolve_model_path
from .weight_files import check_variant

log = logging.getLogger(__name__)


@attrs.frozen
class Source:
    """What ``model`` resolves to, before any weights are read."""

    model: str  # as the user named it
    folder: Path
    index: ModelIndex
    pipeline_cls: type
    record: Any  # the ConfigRegistration chosen for it
    config: Any  # its PipelineConfig, configured from model_index.json
    sampling_params_cls: type

    @property
    def wanted(self) -> list[str]:
        """The components the pipeline loads that the checkpoint has, in loading order."""
        names = [*self.pipeline_cls._required_config_modules, *self.config.optional_components]
        return [n for n in dict.fromkeys(names) if n in self.index.components]


@attrs.frozen
class Placement:
    """Where and in which precision the weights load: ``dtypes`` per component, ``load_device`` (the CPU when
    offloaded), and why bf16 was replaced by float32 (None when it was not)."""

    dtypes: dict
    load_device: str
    slow_bf16: Optional[str] = None


def _alias_source(rec) -> Optional[str]:
    if rec is None or rec.source is None:
        return None
    src = resolve_ref(rec.source) if isinstance(rec.source, str) and ":" in rec.source else rec.source
    return str(src() if callable(src) else src)


def resolve_source(model: str | Path, engine: EngineArgs, registry) -> Source:
    """Step 1: the folder (downloaded if a Hub id), its model_index.json, and the registrations serving it."""
    model = str(model)
    alias_rec = registry.config_for_alias(model)
    location = _alias_source(alias_rec) or model
    folder = resolve_model_path(location, revision=engine.revision, allow_pickle=engine.allow_pickle,
                                variant=engine.variant, allow_external_links=engine.allow_external_links)
    index = read_model_index(folder)
    if engine.variant:
        check_variant(folder, index.components, engine.variant)
    pipeline_cls = registry.get("pipelines", index.class_name)
    rec = alias_rec if alias_rec is not None and alias_rec.pipeline_name == index.class_name else \
        registry.select_config(model, index, folder)
    config = resolve_ref(rec.pipeline_config)()
    config.configure_from_index(index)
    return Source(model=model, folder=folder, index=index, pipeline_cls=pipeline_cls, record=rec, config=config,
                  sampling_params_cls=resolve_ref(rec.sampling_params))


def check_engine(source: Source, engine: EngineArgs, registry) -> None:
    """Step 2: refuse what cannot work with this model before any weights are read."""
    from ..pipeline import resolve_attention_backend, resolve_cache_policy

    resolve_attention_backend(engine, registry)
    resolve_cache_policy(engine, registry)
    source.pipeline_cls.check_components(source.index.components, source.config)
    if engine.quantization:
        check_supported(engine.quantization, engine.device)
    unknown = sorted(set(engine.gguf or {}) - set(source.index.components))
    if unknown:
        raise ConfigError(f"gguf names component(s) {', '.join(unknown)} that {source.folder} does not have; "
                          f"its components: {', '.join(sorted(source.index.components))}")


def parallel_layout(source: Source, engine: EngineArgs) -> EngineArgs:
    """Step 3: the sequence/CFG layout checked against the model; under one, this rank's own device."""
    parallel.check_parallel(engine.sp_degree, engine.cfg_parallel, source.config, source.folder,
                            source.index.class_name)
    if engine.world_size > 1:
        return attrs.evolve(engine, device=parallel.groups.rank_device(engine.device))
    return engine


def choose_precision(source: Source, engine: EngineArgs) -> Placement:
    """Step 4: each component's dtype (the model's, an override, or float32 where bf16 is slow) and the
    device its weights load on; sets torch's CPU threads when ``num_threads`` asks."""
    if engine.num_threads:
        torch.set_num_threads(engine.num_threads)
    dtypes, slow_bf16 = precision.resolve(source.config, source.wanted, engine.dtype, engine.device)
    return Placement(dtypes=dtypes, load_device="cpu" if engine.offload else engine.device, slow_bf16=slow_bf16)


def quantizer_for(engine: EngineArgs) -> Optional[LayerQuantizer]:
    """The streaming quantizer ``load_components`` feeds the denoisers' layers to (None without quantization)."""
    return LayerQuantizer(engine.quantization) if engine.quantization else None


def load_components(source: Source, engine: EngineArgs, placement: Placement, registry,
                    quantizer: Optional[LayerQuantizer] = None) -> dict[str, Any]:
    """Step 5: build every wanted component and load its weights (GGUF files where ``engine.gguf`` names
    them); the denoisers' layers go through ``quantizer`` as they load."""
    config, weight_files = source.config, engine.gguf or {}
    components: dict[str, Any] = {}
    for name in source.wanted:
        components[name] = load_component(
            source.folder, source.index.components[name], module_classes=registry.module_classes(),
            scheduler_classes=registry.scheduler_classes(), dtype=placement.dtypes[name],
            device=placement.load_device, allow_pickle=engine.allow_pickle, custom_loaders=config.custom_loaders(),
            variant=engine.variant, weight_files=[weight_files[name]] if name in weight_files else None,
            on_module=quantizer if quantizer is not None and name in config.denoiser_components else None,
        )
    precision.explain({n: c for n, c in components.items() if placement.dtypes.get(n) != config.dtype_for(n)},
                      placement.slow_bf16)
    return components


def place_weights(components: dict, source: Source, engine: EngineArgs,
                  quantizer: Optional[LayerQuantizer] = None) -> Optional[dict]:
    """Step 6: finish quantization (a custom loader's module is quantized here), then attach offloading;
    returns the offload hooks (None without offload)."""
    config = source.config
    if quantizer is not None:
        quantizer.finish()
        late = [components[n] for n in config.denoiser_components if isinstance(components.get(n), torch.nn.Module)]
        count = quantizer.count + sum(quantize_model(m, quantizer.scheme) for m in late)
        log.info("quantized %d linear layers of %s to %s", count, ", ".join(config.denoiser_components),
                 quantizer.scheme)
    if not engine.offload:
        return None
    return offload.apply(components, engine.offload, engine.device, config.denoiser_components)
