"""diffcore entry point for ltx: hook implementations only.

diffcore imports this module at start-up to list the plugin, so it must stay cheap: no torch, and
classes are named by import strings that diffcore resolves when a model is loaded.
"""
from diffcore.hookspecs import hookimpl
from diffcore.records import ConfigRegistration, ModuleRegistration, PipelineRegistration

_P = "diffcore_ltx.pipelines:"
_C = "diffcore_ltx.configs:"


@hookimpl
def register_pipelines():
    return [
        PipelineRegistration("LTX2Pipeline", _P + "LTX2Pipeline", "ltx"),
        PipelineRegistration("LTX2ImageToVideoPipeline", _P + "LTX2ImageToVideoPipeline", "ltx"),
    ]


@hookimpl
def register_configs():
    # Add the Hub ids of real checkpoints (hf_ids=["org/name"]) so they select these configs.
    return [
        ConfigRegistration("ltx", "LTX2Pipeline", _C + "LTX2Config",
                           _C + "LTX2SamplingParams", default_for_pipeline=True),
        ConfigRegistration("ltx-2", "LTX2ImageToVideoPipeline", _C + "LTX2Config",
                           _C + "LTX2SamplingParams", default_for_pipeline=True),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("LTX2Transformer2DModel",
                               "diffcore_ltx.transformer:LTX2Transformer2DModel")]
