"""diffcore's own components, registered through the same hooks as any plugin."""
from __future__ import annotations

from .hookspecs import hookimpl
from .records import ModuleRegistration, SchedulerRegistration, StageRegistration


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


@hookimpl
def register_stages():
    from .stages import STANDARD_STAGES  # no torch-heavy work: stage modules import torch lazily at use

    return [StageRegistration(name, f"diffcore.stages:{name}") for name in STANDARD_STAGES]
