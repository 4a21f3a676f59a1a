"""Timestep, latent and conditioning preparation: everything the denoising loop needs, computed once."""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..errors import SamplingParamError
from ..request import Request
from ..schedulers.base import with_flow_shift
from .base import In, Out, PipelineStage


class TimestepPreparationStage(PipelineStage):
    """Set the scheduler's timesteps on a per-request copy (dynamic shift ``mu`` from the image size).

    The schedule is the checkpoint's scheduler_config.json, as in diffusers; a request's ``flow_shift``
    replaces its fixed shift for that request only."""

    inputs = (In("params"), In("height", int), In("width", int))
    outputs = (Out("timesteps", torch.Tensor), Out("scheduler"))
    batch = "each"  # equal for every request of a batch (the batch key); each gets its own copy

    def __init__(self, config, scheduler):
        super().__init__()
        self.config, self.scheduler = config, scheduler

    def forward(self, req: Request) -> Request:
        scheduler = request_schedule(self.config, self.scheduler, req, req.device)
        req.scheduler, req.timesteps = scheduler, scheduler.timesteps
        return req


def request_schedule(config, base, req: Request, device=None):
    """A copy of ``base`` with the request's timesteps set (its flow_shift, the size's dynamic shift ``mu``).

    A step count the schedule cannot take is a SamplingParamError naming the most it can: a schedule on
    integer timesteps (UniPC) repeats timesteps when the steps are many and the shift large (Wan with
    400 steps), and the sampler would run off its end after all the compute."""
    n = req.params.num_inference_steps
    shift = req.params.flow_shift
    scheduler = with_flow_shift(base, shift) if shift is not None else copy.deepcopy(base)

    def build(steps: int):
        kwargs = {}
        if config.linear_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler, "config", {}).get("use_dynamic_shifting"):
            kwargs["mu"] = config.schedule_mu(scheduler, req)
        scheduler.set_timesteps(steps, device=device, **kwargs)
        return _schedule_ok(scheduler.timesteps)

    if not build(n):
        most = next((k for k in range(n - 1, 0, -1) if build(k)), None)
        name = type(base).__name__
        fix = f"use at most {most} steps" if most else "lower num_inference_steps"
        raise SamplingParamError("num_inference_steps", f"{n} steps are more than this model's {name} schedule can "
                                 f"take (its timesteps repeat or are not finite: the sampler would fail after the "
                                 f"compute); {fix}")
    return scheduler


def _schedule_ok(timesteps) -> bool:
    t = torch.as_tensor(timesteps).double()
    return bool(torch.isfinite(t).all()) and bool((t[1:] < t[:-1]).all())


class LatentPreparationStage(PipelineStage):
    """Draw the initial noise exactly as diffusers does for the same seed, then pack it."""

    inputs = (In("height", int), In("width", int), In("generator", torch.Generator))
    outputs = (Out("latents", torch.Tensor),)
    batch = "each"  # every request's noise from its own generator, exactly as alone

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        shape = self.config.latent_shape(req, self.components)
        dtype = self.config.latent_dtype(self.components)
        noise = torch.randn(shape, generator=req.generator, dtype=dtype, device="cpu").to(req.device)
        req.latents = self.config.pack_latents(noise, req)
        return req


class ConditioningStage(PipelineStage):
    """Per-request constants for the transformer (position ids, RoPE tables, masks, guidance)."""

    inputs = (In("prompt_embeds"), In("latents", torch.Tensor), In("image_latents", required=False),
              In("image_embeds", required=False))
    outputs = (Out("condition", dict),)
    batch = "rows"

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        req.condition = self.config.prepare_condition(self.components, req)
        return req
