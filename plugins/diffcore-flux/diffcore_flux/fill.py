"""FLUX.1-Fill-dev (``FluxFillPipeline``): inpainting by a transformer that reads the masked picture and the mask.

Numerics follow diffusers' ``pipeline_flux_fill.py``: the input picture is re-noised by ``strength`` (1 by
default) as in img2img; the picture with the repaint area blacked out is VAE-encoded (a posterior sample,
after the noise) and packed, the full-resolution mask is folded into 8x8 = 64 channels per latent pixel and
packed (256), and both are concatenated to the latent tokens' channels at every step (384 in all).
"""
from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch

from diffcore.stages import In, Out, PipelineStage
from diffcore.tasks import mask_validator, strength_validator

from .configs import FluxDevConfig, FluxDevSamplingParams


@attrs.define(kw_only=True)
class FluxFillConfig(FluxDevConfig):
    cfg: str = "none"  # FluxFillPipeline has guidance embedding only (no negative prompt)

    def latent_shape(self, req, components) -> tuple[int, ...]:
        """The noise has the VAE's latent channels (the transformer's 384 inputs include the condition)."""
        c = components["vae"].config["latent_channels"]
        return (req.batch_size, c, req.height // self.vae_scale_factor, req.width // self.vae_scale_factor)

    def hook_inputs(self) -> dict:
        """``model_input`` appends ``image_latents`` (the masked picture and the mask) to the latent channels."""
        from diffcore.stages import DenoisingLoopStage

        return {DenoisingLoopStage: (In("image_latents", torch.Tensor),)}

    def model_input(self, latents, req):
        return torch.cat([latents, req.image_latents.to(latents.dtype)], dim=2)


@attrs.define(kw_only=True)
class FluxFillSamplingParams(FluxDevSamplingParams):
    """FluxFillPipeline's defaults: guidance 30, 50 steps, strength 1; ``image`` and ``mask`` are required."""

    num_inference_steps: int = 50
    guidance_scale: float = 30.0
    strength: float = attrs.field(default=1.0, validator=strength_validator)
    mask: Any = attrs.field(default=None, validator=mask_validator)
    min_images: ClassVar[int] = 1
    max_images: ClassVar[int] = 1


class FillConditionStage(PipelineStage):
    """The masked picture's latents and the folded mask, concatenated on the channel axis (``image_latents``)."""

    inputs = (In("images", list), In("mask"), In("height", int), In("width", int), In("generator", torch.Generator),
              In("latents", torch.Tensor))
    outputs = (Out("image_latents", torch.Tensor),)
    batch = "each"  # the posterior sample comes from each request's own generator, after its noise

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req):
        from diffcore.image_processing import resize, to_tensor
        from diffcore.masks import mask_tensor

        cfg, f = self.config, self.config.vae_scale_factor
        mask = mask_tensor(req.mask, req.height, req.width)
        masked = to_tensor([resize(req.images[0], req.height, req.width)]) * (1 - mask)
        z = cfg.encode_init_image(self.components, masked, req).to(req.device, req.latents.dtype)
        h, w = req.height // f, req.width // f
        folded = mask[:, 0].view(1, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, h, w)
        cond = torch.cat([cfg.pack_latents(z, req), cfg.pack_latents(folded.to(req.device, z.dtype), req)], dim=-1)
        req.image_latents = cond.expand(req.batch_size, -1, -1)
        return req
