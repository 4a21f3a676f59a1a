"""diffcore entry point for Z-Image: hook implementations only.

diffcore imports this module at start-up to list the plugin, so it must stay cheap: no torch, and
classes are named by import strings that diffcore resolves when a model is loaded.
"""
from diffcore.hookspecs import hookimpl
from diffcore.records import (CompositionRegistration, ConfigRegistration, LoraFormatRegistration, ModuleRegistration,
                              PipelineRegistration)

_P = "diffcore_zimage.pipelines:"
_C = "diffcore_zimage.configs:"
TURBO, BASE = "Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("ZImagePipeline", _P + "ZImagePipeline", "Z-Image / Z-Image-Turbo text-to-image"),
        PipelineRegistration("ZImageImg2ImgPipeline", _P + "ZImageImg2ImgPipeline", "Z-Image image-to-image (strength)"),
    ]


@hookimpl
def register_compositions():
    return [CompositionRegistration("ZImageImg2ImgPipeline", "ZImagePipeline", "img2img", _P + "ZImageImg2ImgPipeline",
                                    "Z-Image image-to-image on a text-to-image folder (image, strength)"),
            CompositionRegistration("ZImageInpaintPipeline", "ZImagePipeline", "inpaint", _P + "ZImageInpaintPipeline",
                                    "Z-Image inpainting on a text-to-image folder (image, mask, strength)")]


@hookimpl
def register_configs():
    # The base model is the pipeline's default (diffusers' defaults: 50 steps, CFG 5); Turbo is chosen by its
    # Hub id, its alias or a local folder named like it (``is_zimage_turbo``).
    return [
        ConfigRegistration("z-image-turbo", "ZImagePipeline", _C + "ZImageTurboConfig", _C + "ZImageTurboSamplingParams",
                           hf_ids=[TURBO], aliases=["z-image-turbo"], detector=_C + "is_zimage_turbo", source=TURBO),
        ConfigRegistration("z-image", "ZImagePipeline", _C + "ZImageConfig", _C + "ZImageSamplingParams",
                           hf_ids=[BASE], aliases=["z-image"], default_for_pipeline=True, source=BASE),
        ConfigRegistration("z-image-turbo-img2img", "ZImageImg2ImgPipeline", _C + "ZImageTurboConfig",
                           _C + "ZImageTurboImg2ImgSamplingParams", detector=_C + "is_zimage_turbo"),
        ConfigRegistration("z-image-img2img", "ZImageImg2ImgPipeline", _C + "ZImageConfig",
                           _C + "ZImageImg2ImgSamplingParams", default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("ZImageTransformer2DModel", "diffcore_zimage.transformer:ZImageTransformer2DModel")]


@hookimpl
def register_lora_formats():
    return [LoraFormatRegistration("zimage-community", ["ZImageTransformer2DModel"], "diffcore_zimage.lora:is_community",
                                   "diffcore_zimage.lora:convert",
                                   "kohya / ComfyUI / ai-toolkit Z-Image LoRAs (lora_unet_layers_0_attention_qkv, "
                                   "diffusion_model.layers.0..., .alpha)")]
