"""diffcore entry point for Qwen-Image: hook implementations only, no torch import."""
from diffcore.hookspecs import hookimpl
from diffcore.records import (CompositionRegistration, ConfigRegistration, LoraFormatRegistration, ModuleRegistration,
                              PipelineRegistration)

_C = "diffcore_qwen.configs:"
_P = "diffcore_qwen.pipelines:"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("QwenImagePipeline", _P + "QwenImagePipeline", "Qwen-Image text-to-image"),
        PipelineRegistration("QwenImageEditPipeline", _P + "QwenImageEditPipeline", "Qwen-Image-Edit (one input image)"),
        PipelineRegistration("QwenImageEditPlusPipeline", _P + "QwenImageEditPlusPipeline",
                             "Qwen-Image-Edit-2509/2511 (one to three input images)"),
        PipelineRegistration("QwenImageLayeredPipeline", _P + "QwenImageLayeredPipeline",
                             "Qwen-Image-Layered: a picture decomposed into RGBA layers"),
    ]


@hookimpl
def register_compositions():
    return [
        CompositionRegistration("QwenImageImg2ImgPipeline", "QwenImagePipeline", "img2img",
                                _P + "QwenImageImg2ImgPipeline", "Qwen-Image image-to-image (image, strength)"),
        CompositionRegistration("QwenImageInpaintPipeline", "QwenImagePipeline", "inpaint",
                                _P + "QwenImageInpaintPipeline", "Qwen-Image inpainting (image, mask, strength)"),
        CompositionRegistration("QwenImageEditInpaintPipeline", "QwenImageEditPipeline", "inpaint",
                                _P + "QwenImageEditInpaintPipeline",
                                "Qwen-Image-Edit edit-inpainting (image, mask, strength)"),
    ]


@hookimpl
def register_configs():
    return [
        ConfigRegistration("qwen-image", "QwenImagePipeline", _C + "QwenImageConfig", _C + "QwenImageSamplingParams",
                           hf_ids=["Qwen/Qwen-Image", "Qwen/Qwen-Image-2512"], aliases=["qwen-image"],
                           default_for_pipeline=True, source="Qwen/Qwen-Image"),
        ConfigRegistration("qwen-image-edit", "QwenImageEditPipeline", _C + "QwenImageEditConfig",
                           _C + "QwenImageEditSamplingParams", hf_ids=["Qwen/Qwen-Image-Edit"],
                           aliases=["qwen-image-edit"], default_for_pipeline=True, source="Qwen/Qwen-Image-Edit"),
        ConfigRegistration("qwen-image-edit-2509", "QwenImageEditPlusPipeline", _C + "QwenImageEditPlusConfig",
                           _C + "QwenImageEditPlusSamplingParams", hf_ids=["Qwen/Qwen-Image-Edit-2509"],
                           aliases=["qwen-image-edit-2509"], default_for_pipeline=True,
                           source="Qwen/Qwen-Image-Edit-2509"),
        ConfigRegistration("qwen-image-edit-2511", "QwenImageEditPlusPipeline", _C + "QwenImageEditPlusConfig",
                           _C + "QwenImageEditPlusSamplingParams", hf_ids=["Qwen/Qwen-Image-Edit-2511"],
                           aliases=["qwen-image-edit-2511"], detector=_C + "is_zero_cond_t",
                           source="Qwen/Qwen-Image-Edit-2511"),
        ConfigRegistration("qwen-image-layered", "QwenImageLayeredPipeline", "diffcore_qwen.layered:QwenImageLayeredConfig",
                           "diffcore_qwen.layered:QwenImageLayeredSamplingParams", hf_ids=["Qwen/Qwen-Image-Layered"],
                           aliases=["qwen-image-layered"], default_for_pipeline=True, source="Qwen/Qwen-Image-Layered"),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("QwenImageTransformer2DModel", "diffcore_qwen.transformer:QwenImageTransformer2DModel")]


@hookimpl
def register_lora_formats():
    L = "diffcore_qwen.lora:"
    return [
        LoraFormatRegistration("qwen-image-community", ["QwenImageTransformer2DModel"], L + "is_qwen_community", L + "convert_qwen_community",
                               "Qwen-Image LoRAs with kohya naming / alphas (Qwen-Image-Lightning, ComfyUI, musubi)"),
    ]
