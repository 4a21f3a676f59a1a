"""Entry-point module of the toy plugin: hook implementations only, importable without torch."""
from diffcore.hookspecs import hookimpl
from diffcore.records import (AttentionBackendRegistration, CachePolicyRegistration, ConfigRegistration,
                              ModuleRegistration, PipelineRegistration, SchedulerRegistration, StageRegistration)

_C = "toy_plugin.configs:"
_M = "toy_plugin.model:"


@hookimpl
def register_pipelines():
    return [PipelineRegistration("ToyPipeline", "toy_plugin.pipelines:ToyPipeline", "toy text-to-image")]


@hookimpl
def register_configs():
    return [
        ConfigRegistration("toy-base", "ToyPipeline", _C + "ToyConfig", _C + "ToySamplingParams",
                           hf_ids=["diffcore-test/toy-base"], aliases=["toy"], default_for_pipeline=True,
                           source="toy_plugin.checkpoint:default_folder"),
        ConfigRegistration("toy-large", "ToyPipeline", _C + "ToyLargeConfig", _C + "ToyLargeSamplingParams",
                           hf_ids=["diffcore-test/toy-large"], detector=_C + "is_toy_large"),
    ]


@hookimpl
def register_modules():
    return [ModuleRegistration("ToyTransformer2DModel", _M + "ToyTransformer2DModel")]


@hookimpl
def register_schedulers():
    return [SchedulerRegistration("ToyFlowScheduler", _M + "ToyFlowScheduler")]


@hookimpl
def register_stages():
    return [StageRegistration("ToyNoopStage", _M + "ToyNoopStage")]


@hookimpl
def register_attention_backends():
    return [AttentionBackendRegistration("toy-counting", _M + "counting_attention")]


@hookimpl
def register_cache_policies():
    return [CachePolicyRegistration("toy-cache", _M + "ToyStepCache")]
