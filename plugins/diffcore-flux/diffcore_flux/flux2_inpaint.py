"""FLUX.2 [klein] inpainting on a loaded Flux2KleinPipeline checkpoint (diffusers' ``Flux2KleinInpaintPipeline``).

What differs from the generic inpaint composition (``diffcore.stages.image_to_image``), after diffusers:

* the picture is painted at its own size (area capped at 1024^2, floored to multiples of 16): an explicit
  height / width of another size is refused rather than ignored;
* its latents are the VAE posterior's mode (no sample), patchified and batch-norm normalised like every
  FLUX.2 latent, and the same latents are also fed to the transformer as reference tokens (t = 10), so
  the model sees the whole picture while it repaints the masked part; ``image[1:]`` are further references
  (diffusers' ``image_reference``: t = 20, 30, ...), prepared like the klein editing references;
* the binarised mask is brought to the 16x-smaller token grid bilinearly (a soft edge), not nearest;
* ``strength`` defaults to 0.8 (diffusers' call default).
"""
from __future__ import annotations

import math

import torch

from diffcore.errors import SamplingParamError
from diffcore.request import Request
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, In, Out, PipelineStage,
                             TextEncodingStage, TimestepPreparationStage)
from diffcore.stages.image_to_image import (InitLatentsStage, InpaintBlendStage, InpaintValidationStage,
                                           MaskPreparationStage, StrengthStage)
from diffcore.tasks import INPAINT

from .flux2_configs import REF_MAX_AREA, prepare_reference, reference_size
from .pipelines import Flux2KleinPipeline


class KleinInpaintValidationStage(InpaintValidationStage):
    """The inpaint checks, and the output size = the picture's (diffusers ignores height / width here)."""

    def forward(self, req: Request) -> Request:
        from diffcore.image_processing import resize

        req = super().forward(req)
        picture = req.images[0]
        h, w = reference_size(picture, self.config.size_multiple)
        if (req.height, req.width) != (h, w):
            raise SamplingParamError("height", f"FLUX.2 [klein] inpainting paints at the picture's own size ({w}x{h}: "
                                               f"{picture.size[0]}x{picture.size[1]} floored to multiples of 16, at most "
                                               f"1024x1024 in area), not {req.width}x{req.height}; leave height and "
                                               "width out, or resize the picture")
        pw, ph = picture.size
        if pw * ph > REF_MAX_AREA:  # diffusers first scales the picture to 1024^2 in area, then resizes to (h, w)
            scale = math.sqrt(REF_MAX_AREA / (pw * ph))
            req.images = [resize(picture, int(ph * scale), int(pw * scale))] + list(req.images[1:])
        return req


class PictureLatentsStage(InitLatentsStage):
    """The picture's latents (posterior mode, normalised) re-noised to the first remaining timestep."""

    def encode(self, pixels: torch.Tensor, req: Request) -> torch.Tensor:
        vae = self.components["vae"]
        with torch.inference_mode():
            return vae.normalize(vae.encode(pixels.to(req.device, vae.dtype)).mode())


class ReferenceLatentsStage(PipelineStage):
    """The reference tokens: the picture's own latents (t = 10), then each further reference image's."""

    inputs = (In("images", list), In("init_latents", torch.Tensor))
    outputs = (Out("image_latents", torch.Tensor),)
    batch = "each"

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        from diffcore.image_processing import to_tensor

        vae = self.components["vae"]
        tokens = [req.init_latents[:1]]
        for im in req.images[1:]:
            z = vae.normalize(vae.encode(to_tensor([prepare_reference(im)]).to(req.device, vae.dtype)).mode())
            tokens.append(self.config.pack_latents(z, req).to(tokens[0].dtype))
        refs = torch.cat(tokens, dim=1)
        req.image_latents = refs.expand(req.batch_size, -1, -1).to(self.components["transformer"].dtype)
        return req


class Flux2KleinInpaintPipeline(Flux2KleinPipeline):
    """Inpainting on a FLUX.2 [klein] checkpoint: ``image`` (the picture, then optional references) + ``mask`` +
    ``strength``; the picture is both the start of the loop and a reference."""

    task = INPAINT
    default_strength = 0.8

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", KleinInpaintValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("strength", StrengthStage())
        self.add_stage("init_latents", PictureLatentsStage(cfg, c))
        self.add_stage("reference_latents", ReferenceLatentsStage(cfg, c))
        self.add_stage("mask_preparation", MaskPreparationStage(cfg, c, mode="bilinear"))
        self.add_stage("inpaint_blend", InpaintBlendStage())
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))
