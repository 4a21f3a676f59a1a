"""Z-Image pipelines: short compositions of diffcore's standard stages (plus the img2img start point).

The model-specific work happens in the config's hooks (``configs.py``); diffcore proves at build time that
each stage's inputs are produced by the request or an earlier stage.
"""
from __future__ import annotations

import torch

from diffcore.pipeline import ComposedPipelineBase
from diffcore.request import Request
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, ImageVAEEncodingStage, In,
                             InputValidationStage, LatentPreparationStage, Out, PipelineStage, TextEncodingStage,
                             TimestepPreparationStage)


class StrengthStage(PipelineStage):
    """img2img: start the schedule at ``strength`` and noise the input image's latents to that point.

    As diffusers' ``get_timesteps`` + ``scale_noise``: keep the last ``int(N * strength)`` timesteps (the
    scheduler begins there) and mix ``sigma * noise + (1 - sigma) * image`` at the first kept sigma."""

    inputs = (In("params"), In("timesteps", torch.Tensor), In("scheduler"), In("latents", torch.Tensor),
              In("image_latents", torch.Tensor))
    outputs = (Out("timesteps", torch.Tensor), Out("latents", torch.Tensor))
    batch = "each"  # the schedule is equal across a batch (strength is in the batch key); noise is per request

    def __init__(self, name: str = "strength"):
        super().__init__(name)

    def forward(self, req: Request) -> Request:
        from diffcore.errors import SamplingParamError

        n, strength = len(req.timesteps), req.params.strength
        start = int(max(n - min(n * strength, n), 0))
        if start >= n:
            raise SamplingParamError("strength", f"strength={strength} with num_inference_steps={n} leaves no "
                                                 "denoising step; raise strength or the step count")
        req.scheduler.set_begin_index(start)
        req.timesteps = req.timesteps[start:]
        sigma = req.scheduler.sigmas[start].to(req.latents.device, req.latents.dtype)
        req.latents = sigma * req.latents + (1.0 - sigma) * req.image_latents.to(req.latents.dtype)
        return req


class ZImagePipeline(ComposedPipelineBase):
    """Text-to-image: Qwen3 prompt features -> single-stream DiT (CFG policy per step) -> AutoencoderKL."""

    pipeline_name = "ZImagePipeline"
    _required_config_modules = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
    img2img = False

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        if self.img2img:  # encoded before the noise is drawn: both take the request's generator, in this order
            self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        if self.img2img:
            self.add_stage("strength", StrengthStage())
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))


class ZImageImg2ImgPipeline(ZImagePipeline):
    """Image-to-image: the input image's latents noised to ``strength``, then the text-to-image loop."""

    pipeline_name = "ZImageImg2ImgPipeline"
    img2img = True
