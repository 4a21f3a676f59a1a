"""diffcore entry point for zimage: hook implementations only.

diffcore imports this module at start-up to list the plugin, so it must stay cheap: no torch, and
classes are named by import strings that diffcore resolves when a model is loaded.
"""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, ModuleRegistration, PipelineRegistration

_P = "diffcore_zimage.pipelines:"
_C = "diffcore_zimage.configs:"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("ZImagePipeline", _P + "ZImagePipeline", "zimage"),
        PipelineRegistration("ZImageImg2ImgPipeline", _P + "ZImageImg2ImgPipeline", "zimage"),
    ]


@hookimpl
def register_configs():
    # Add the Hub ids of real checkpoints (hf_ids=["org/name"]) so they select these configs.
    return [
        ConfigRegistration("zimage", "ZImagePipeline", _C + "ZImageConfig",
                           _C + "ZImageSamplingParams", default_for_pipeline=True),
        ConfigRegistration("zimage-2", "ZImageImg2ImgPipeline", _C + "ZImageConfig",
                           _C + "ZImageSamplingParams", default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("ZImageTransformer2DModel",
                               "diffcore_zimage.transformer:ZImageTransformer2DModel")]
