"""diffcore entry point for FLUX.1: hook implementations only, no torch import."""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, LoraFormatRegistration, ModuleRegistration, PipelineRegistration

_C = "diffcore_flux.configs:"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("FluxPipeline", "diffcore_flux.pipelines:FluxPipeline", "FLUX.1 text-to-image"),
        PipelineRegistration("FluxKontextPipeline", "diffcore_flux.pipelines:FluxKontextPipeline", "FLUX.1 Kontext image editing"),
    ]


@hookimpl
def register_configs():
    return [
        ConfigRegistration("flux-dev", "FluxPipeline", _C + "FluxDevConfig", _C + "FluxDevSamplingParams",
                           hf_ids=["black-forest-labs/FLUX.1-dev"], aliases=["flux-dev"],
                           detector=_C + "is_flux_dev", default_for_pipeline=True),
        ConfigRegistration("flux-schnell", "FluxPipeline", _C + "FluxSchnellConfig", _C + "FluxSchnellSamplingParams",
                           hf_ids=["black-forest-labs/FLUX.1-schnell"], aliases=["flux-schnell"],
                           detector=_C + "is_flux_schnell"),
        ConfigRegistration("flux-kontext-dev", "FluxKontextPipeline", _C + "FluxKontextConfig",
                           _C + "FluxKontextSamplingParams", hf_ids=["black-forest-labs/FLUX.1-Kontext-dev"],
                           aliases=["flux-kontext"], default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("FluxTransformer2DModel", "diffcore_flux.transformer:FluxTransformer2DModel")]


@hookimpl
def register_lora_formats():
    L = "diffcore_flux.lora:"
    return [
        LoraFormatRegistration("flux-kohya", ["FluxTransformer2DModel"], L + "is_kohya", L + "convert_kohya",
                               "kohya / sd-scripts and ComfyUI FLUX LoRAs (lora_unet_double_blocks_...)"),
        LoraFormatRegistration("flux-xlabs", ["FluxTransformer2DModel"], L + "is_xlabs", L + "convert_xlabs",
                               "XLabs FLUX LoRAs (double_blocks.N.processor.qkv_lora1...)"),
    ]
