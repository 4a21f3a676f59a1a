"""diffcore: a plugin-based inference SDK for diffusion models.

Public API: ``DiffGenerator``, ``SamplingParams``, ``PipelineConfig``, ``EngineArgs``,
``ComposedPipelineBase``, ``PipelineStage``, ``BatchScheduler`` and the hook markers for plugins.
"""
__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (cheap: pluggy only)

_LAZY = {
    "DiffGenerator": "diffcore.api:DiffGenerator",
    "GenerationResult": "diffcore.outputs:GenerationResult",
    "SamplingParams": "diffcore.configs.sampling_params:SamplingParams",
    "PipelineConfig": "diffcore.configs.pipeline_config:PipelineConfig",
    "EngineArgs": "diffcore.configs.engine_args:EngineArgs",
    "ComposedPipelineBase": "diffcore.pipeline:ComposedPipelineBase",
    "PipelineStage": "diffcore.stages.base:PipelineStage",
    "Request": "diffcore.request:Request",
    "BatchScheduler": "diffcore.engine.batching:BatchScheduler",
}


def __getattr__(name):  # lazy, so `import diffcore` in a plugin's entry point does not import torch
    if name in _LAZY:
        from .records import resolve_ref

        value = resolve_ref(_LAZY[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffcore' has no attribute {name!r}")


__all__ = ["hookimpl", *_LAZY]
