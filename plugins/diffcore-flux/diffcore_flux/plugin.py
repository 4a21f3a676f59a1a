"""diffcore entry point for FLUX.1 and FLUX.2: hook implementations only, no torch import."""
from diffcore.hookspecs import hookimpl
from diffcore.records import (CompositionRegistration, ConfigRegistration, LoraFormatRegistration, ModuleRegistration,
                              PipelineRegistration)

_C = "diffcore_flux.configs:"
_F2 = "diffcore_flux.flux2_configs:"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("FluxPipeline", "diffcore_flux.pipelines:FluxPipeline", "FLUX.1 text-to-image"),
        PipelineRegistration("FluxKontextPipeline", "diffcore_flux.pipelines:FluxKontextPipeline", "FLUX.1 Kontext image editing"),
        PipelineRegistration("Flux2Pipeline", "diffcore_flux.pipelines:Flux2Pipeline",
                             "FLUX.2 [dev] text-to-image and multi-reference editing"),
        PipelineRegistration("Flux2KleinPipeline", "diffcore_flux.pipelines:Flux2KleinPipeline",
                             "FLUX.2 [klein] 4B/9B (distilled or base) text-to-image and editing"),
        PipelineRegistration("Flux2KleinKVPipeline", "diffcore_flux.pipelines:Flux2KleinKVPipeline",
                             "FLUX.2 [klein] 9B-KV (reference K/V cached per request)"),
        PipelineRegistration("FluxFillPipeline", "diffcore_flux.pipelines:FluxFillPipeline",
                             "FLUX.1-Fill-dev inpainting (image, mask)"),
    ]


@hookimpl
def register_compositions():
    P = "diffcore_flux.pipelines:"
    return [
        CompositionRegistration("FluxImg2ImgPipeline", "FluxPipeline", "img2img", P + "FluxImg2ImgPipeline",
                                "FLUX.1 image-to-image (image, strength)"),
        CompositionRegistration("FluxInpaintPipeline", "FluxPipeline", "inpaint", P + "FluxInpaintPipeline",
                                "FLUX.1 inpainting (image, mask, strength)"),
        CompositionRegistration("Flux2KleinInpaintPipeline", "Flux2KleinPipeline", "inpaint",
                                "diffcore_flux.flux2_inpaint:Flux2KleinInpaintPipeline",
                                "FLUX.2 [klein] inpainting (image, mask, strength; the picture is also a reference)"),
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
        ConfigRegistration("flux2-dev", "Flux2Pipeline", _F2 + "Flux2DevConfig", _F2 + "Flux2DevSamplingParams",
                           hf_ids=["black-forest-labs/FLUX.2-dev"], aliases=["flux2-dev"], default_for_pipeline=True),
        ConfigRegistration("flux2-klein", "Flux2KleinPipeline", _F2 + "Flux2KleinConfig",
                           _F2 + "Flux2KleinSamplingParams",
                           hf_ids=["black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B"],
                           aliases=["flux2-klein-4b", "flux2-klein-9b"], detector=_F2 + "is_klein_distilled"),
        ConfigRegistration("flux2-klein-base", "Flux2KleinPipeline", _F2 + "Flux2KleinConfig",
                           _F2 + "Flux2KleinBaseSamplingParams",
                           hf_ids=["black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B"],
                           aliases=["flux2-klein-base-4b", "flux2-klein-base-9b"], default_for_pipeline=True),
        ConfigRegistration("flux2-klein-kv", "Flux2KleinKVPipeline", _F2 + "Flux2KleinKVConfig",
                           _F2 + "Flux2KleinSamplingParams", hf_ids=["black-forest-labs/FLUX.2-klein-9b-kv"],
                           aliases=["flux2-klein-9b-kv"], default_for_pipeline=True),
        ConfigRegistration("flux-fill-dev", "FluxFillPipeline", "diffcore_flux.fill:FluxFillConfig",
                           "diffcore_flux.fill:FluxFillSamplingParams", hf_ids=["black-forest-labs/FLUX.1-Fill-dev"],
                           aliases=["flux-fill"], default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("FluxTransformer2DModel", "diffcore_flux.transformer:FluxTransformer2DModel"),
            ModuleRegistration("Flux2Transformer2DModel", "diffcore_flux.flux2_transformer:Flux2Transformer2DModel"),
            ModuleRegistration("AutoencoderKLFlux2", "diffcore_flux.flux2_vae:AutoencoderKLFlux2")]


@hookimpl
def register_lora_formats():
    L = "diffcore_flux.lora:"
    return [
        LoraFormatRegistration("flux-kohya", ["FluxTransformer2DModel"], L + "is_kohya", L + "convert_kohya",
                               "kohya / sd-scripts and ComfyUI FLUX LoRAs (lora_unet_double_blocks_...)"),
        LoraFormatRegistration("flux-xlabs", ["FluxTransformer2DModel"], L + "is_xlabs", L + "convert_xlabs",
                               "XLabs FLUX LoRAs (double_blocks.N.processor.qkv_lora1...)"),
        LoraFormatRegistration("flux2-bfl", ["Flux2Transformer2DModel"], "diffcore_flux.flux2_lora:is_bfl",
                               "diffcore_flux.flux2_lora:convert_bfl",
                               "FLUX.2 LoRAs with BFL names: kohya (lora_unet_...), ai-toolkit / ComfyUI (diffusion_model.)"),
    ]
