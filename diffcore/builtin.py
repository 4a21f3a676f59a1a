"""diffcore's own components, registered through the same hooks as any plugin."""
from __future__ import annotations

from .hookspecs import hookimpl
from .records import (AttentionBackendRegistration, CachePolicyRegistration, ModuleRegistration, SchedulerRegistration,
                      StageRegistration)


@hookimpl
def register_modules():
    return [
        ModuleRegistration("AutoencoderKL", "diffcore.models.autoencoder_kl:AutoencoderKL"),
        ModuleRegistration("AutoencoderKLWan", "diffcore.models.autoencoder_kl_wan:AutoencoderKLWan"),
        ModuleRegistration("AutoencoderKLQwenImage", "diffcore.models.autoencoder_kl_wan:AutoencoderKLQwenImage"),
    ]


@hookimpl
def register_schedulers():
    return [
        SchedulerRegistration("FlowMatchEulerDiscreteScheduler", "diffcore.schedulers.flow_match_euler:FlowMatchEulerDiscreteScheduler"),
        SchedulerRegistration("UniPCMultistepScheduler", "diffcore.schedulers.unipc:UniPCMultistepScheduler"),
    ]


_STAGES = ("InputValidationStage", "TextEncodingStage", "ImageEncodingStage", "ImageVAEEncodingStage",
           "TimestepPreparationStage", "LatentPreparationStage", "ConditioningStage", "DenoisingStage", "DmdDenoisingStage",
           "CausalDMDDenoisingStage", "DecodingStage")


@hookimpl
def register_stages():
    # Import strings, so building the registry (e.g. `diffcore plugins`) does not import torch.
    return [StageRegistration(name, f"diffcore.stages:{name}") for name in _STAGES]


@hookimpl
def register_attention_backends():
    # Registered like a plugin's, so a plugin claiming "sdpa" is a conflict (disabled), not a silent replacement.
    return [AttentionBackendRegistration("sdpa", "diffcore.models.attention:_sdpa"),
            AttentionBackendRegistration("math", "diffcore.models.attention:_math")]


@hookimpl
def register_cache_policies():
    return [
        CachePolicyRegistration("fbcache", "diffcore.cache.policies:FirstBlockCache"),
        CachePolicyRegistration("teacache", "diffcore.cache.policies:TeaCache"),
        CachePolicyRegistration("fbcache_taylor", "diffcore.cache.policies:TaylorFirstBlockCache"),
    ]
