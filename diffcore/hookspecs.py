"""Hook specifications: what a diffcore plugin may implement.

A plugin is a module exposed through the ``diffcore`` entry-point group whose functions are
decorated with ``diffcore.hookimpl``. Every hook returns a list of typed records (``diffcore.records``).
Classes may be import strings so the plugin module never has to import torch. Each hook is
documented in docs/plugin-hooks.md (a test checks this).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("diffcore")
hookimpl = pluggy.HookimplMarker("diffcore")


@hookspec
def register_pipelines():
    """Return PipelineRegistration records: pipeline classes keyed by Diffusers ``_class_name``.

    Example::

        @hookimpl
        def register_pipelines():
            return [PipelineRegistration("FluxPipeline", "diffcore_flux.pipelines:FluxPipeline")]
    """


@hookspec
def register_configs():
    """Return ConfigRegistration records: PipelineConfig + SamplingParams per model, with the HF ids,
    aliases or detectors they serve.

    Example::

        @hookimpl
        def register_configs():
            return [ConfigRegistration("flux-dev", "FluxPipeline", "diffcore_flux.configs:FluxDevConfig",
                                       "diffcore_flux.configs:FluxDevSamplingParams",
                                       hf_ids=["black-forest-labs/FLUX.1-dev"])]
    """


@hookspec
def register_modules():
    """Return ModuleRegistration records: model classes keyed by their Diffusers class name.

    Example::

        @hookimpl
        def register_modules():
            return [ModuleRegistration("FluxTransformer2DModel", "diffcore_flux.transformer:FluxTransformer2DModel")]
    """


@hookspec
def register_schedulers():
    """Return SchedulerRegistration records keyed by scheduler_config.json's ``_class_name``.

    Example::

        @hookimpl
        def register_schedulers():
            return [SchedulerRegistration("MyScheduler", "my_pkg.sched:MyScheduler")]
    """


@hookspec
def register_stages():
    """Return StageRegistration records: reusable PipelineStage classes other plugins may compose.

    Example::

        @hookimpl
        def register_stages():
            return [StageRegistration("MyUpscaleStage", "my_pkg.stages:MyUpscaleStage")]
    """


@hookspec
def register_attention_backends():
    """Return AttentionBackendRegistration records; select one with ``EngineArgs(attention_backend=name)``.

    Example::

        @hookimpl
        def register_attention_backends():
            return [AttentionBackendRegistration("my-flash", "my_pkg.attn:flash_attention")]
    """


@hookspec
def register_cache_policies():
    """Return CachePolicyRegistration records; select one with ``EngineArgs(cache=name)``.

    Example::

        @hookimpl
        def register_cache_policies():
            return [CachePolicyRegistration("mycache", "my_pkg.cache:MyCache")]
    """


@hookspec
def register_lora_formats():
    """Return LoraFormatRegistration records: community LoRA layouts a family's denoiser accepts, with a
    detector and a converter into the diffusers / PEFT layout.

    Example::

        @hookimpl
        def register_lora_formats():
            return [LoraFormatRegistration("flux-kohya", ["FluxTransformer2DModel"], "diffcore_flux.lora:is_kohya",
                                           "diffcore_flux.lora:convert_kohya")]
    """


@hookspec
def register_compositions():
    """Return CompositionRegistration records: extra tasks (image-to-image, inpainting) a loaded pipeline
    serves with the same weights, each a ComposedPipelineBase subclass chosen per request.

    Example::

        @hookimpl
        def register_compositions():
            return [CompositionRegistration("FluxImg2ImgPipeline", "FluxPipeline", "img2img",
                                            "diffcore_flux.tasks:FluxImg2ImgPipeline")]
    """
