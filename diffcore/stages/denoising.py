"""DenoisingStage: the sampling loop, with CFG policies, two-expert switching and a step-cache seam."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..request import Request
from .base import In, Out, PipelineStage

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, timestep, latents)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, norm_rescale: bool) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``; with norm_rescale the result keeps the norm of ``cond``
    along the channel axis (Qwen-Image's true CFG)."""
    out = uncond + scale * (cond - uncond)
    if norm_rescale:
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        out_norm = torch.norm(out, dim=-1, keepdim=True)
        out = out * (cond_norm / out_norm)
    return out


class DenoisingStage(PipelineStage):
    """Run the transformer(s) over the timesteps and step the scheduler.

    ``transformers`` holds one model, or two for Wan 2.2 A14B: the second serves timesteps below
    ``config.boundary_ratio * num_train_timesteps``. ``step_cache`` (optional) wraps every model call
    and may return a cached prediction instead of running the model.
    """

    inputs = (In("latents", torch.Tensor), In("timesteps", torch.Tensor), In("scheduler"), In("condition", dict),
              In("do_cfg", bool))
    outputs = (Out("latents", torch.Tensor),)

    def __init__(self, config, transformers: list, name: str = "denoising", progress: bool = True,
                 callback: Optional[StepCallback] = None, step_cache=None):
        super().__init__(name)
        self.config, self.transformers = config, [t for t in transformers if t is not None]
        self.progress, self.callback, self.step_cache = progress, callback, step_cache

    def _expert(self, t: torch.Tensor, scheduler) -> int:
        ratio = self.config.boundary_ratio
        if ratio is None or len(self.transformers) < 2:
            return 0
        boundary = ratio * scheduler.config.get("num_train_timesteps", 1000)
        return 0 if t >= boundary else 1

    def _predict(self, model, latents, t, kwargs, step: int, branch: str) -> torch.Tensor:
        x = self.config.model_input(latents, self._req)
        timestep = self.config.model_timestep(t, x, self._req)
        if self.step_cache is not None:
            out = self.step_cache(model, step, branch, hidden_states=x, timestep=timestep, **kwargs)
        else:
            out = model(hidden_states=x, timestep=timestep, **kwargs)
        return self.config.model_output(out, self._req)

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        self._req = req
        scheduler, latents = req.scheduler, req.latents
        cond_kwargs, uncond_kwargs = req.condition["cond"], req.condition.get("uncond")
        if self.step_cache is not None:
            self.step_cache.reset(len(req.timesteps))
        bar = tqdm(req.timesteps, desc="denoising", disable=not self.progress, leave=False)
        for i, t in enumerate(bar):
            expert = self._expert(t, scheduler)
            model = self.transformers[expert]
            pred = self._predict(model, latents, t, cond_kwargs, i, "cond")
            if req.do_cfg:
                uncond = self._predict(model, latents, t, uncond_kwargs, i, "uncond")
                scale = self.config.guidance_scale_at(t, req, expert)
                pred = combine_guidance(pred, uncond, scale, self.config.cfg_norm_rescale)
            latents = scheduler.step(pred, t, latents)
            callback = req.callback or self.callback
            if callback is not None:
                callback(i, t, latents)
        req.latents = latents
        req.condition = None  # per-request tensors (RoPE tables, cached text K/V) must not outlive the loop into decoding
        self._req = None
        return req


class DecodingStage(PipelineStage):
    """Latents -> pixels in [0, 1] through the model's ``decode`` hook (VAE + latent normalisation)."""

    inputs = (In("latents", torch.Tensor), In("height", int), In("width", int))
    outputs = (Out("output", torch.Tensor),)

    def __init__(self, config, components: dict, name: str = "decoding"):
        super().__init__(name)
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        if req.params.output_type == "latent":
            req.output = req.latents
            return req
        req.output = self.config.decode(self.components, req.latents, req)
        return req
