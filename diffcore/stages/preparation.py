"""Timestep, latent and conditioning preparation: everything the denoising loop needs, computed once."""
from __future__ import annotations

import copy

import numpy as np
import torch

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
        n = req.params.num_inference_steps
        shift = getattr(req.params, "flow_shift", None)
        scheduler = with_flow_shift(self.scheduler, shift) if shift is not None else copy.deepcopy(self.scheduler)
        kwargs = {}
        if self.config.linear_sigmas:
            kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
        sched_cfg = getattr(scheduler, "config", {})
        if sched_cfg.get("use_dynamic_shifting"):
            kwargs["mu"] = self.config.schedule_mu(scheduler, req)
        scheduler.set_timesteps(n, device=req.device, **kwargs)
        req.scheduler, req.timesteps = scheduler, scheduler.timesteps
        return req


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
