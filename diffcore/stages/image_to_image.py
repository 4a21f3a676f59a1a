"""Image-to-image and inpainting stages, and the rewrite that turns a text-to-image composition into them.

Numerics follow diffusers' ``Flux/QwenImage{Img2Img,Inpaint}Pipeline``: the input picture is resized to the
output size, VAE-encoded (a posterior sample from the request's generator), re-noised to the first
timestep left by ``strength``; inpainting re-imposes the kept region (mask 0), re-noised to the next
timestep, after every scheduler step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import SamplingParamError
from ..request import Request
from ..tasks import IMG2IMG, INPAINT
from .base import In, Out, PipelineStage
from .input_validation import InputValidationStage


class StrengthStage(PipelineStage):
    """Start part-way down the schedule: the last ``strength`` of the steps remain (diffusers' ``get_timesteps``)."""

    inputs = (In("params"), In("timesteps", torch.Tensor), In("scheduler"))
    outputs = (Out("timesteps", torch.Tensor),)
    batch = "each"  # strength is part of the batch key: every request of a batch has the same schedule

    def forward(self, req: Request) -> Request:
        n, strength = len(req.timesteps), req.params.strength
        order = getattr(req.scheduler, "order", 1)
        t_start = int(max(n - min(n * strength, n), 0))
        req.timesteps = req.timesteps[t_start * order:]
        req.scheduler.set_begin_index(t_start * order)
        if len(req.timesteps) < 1:
            raise SamplingParamError("strength", f"strength={strength} leaves no denoising step of "
                                                 f"{req.params.num_inference_steps}; raise strength or the step count")
        return req


class InitLatentsStage(PipelineStage):
    """The input picture's latents, re-noised to the first remaining timestep: the start of the loop."""

    inputs = (In("images", list), In("height", int), In("width", int), In("generator", torch.Generator),
              In("timesteps", torch.Tensor), In("scheduler"))
    outputs = (Out("latents", torch.Tensor), Out("init_latents", torch.Tensor), Out("init_noise", torch.Tensor))
    batch = "each"  # every request's posterior sample and noise from its own generator, as alone

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        from ..image_processing import resize, to_tensor

        cfg = self.config
        pixels = to_tensor([resize(req.images[0], req.height, req.width)])
        z = self.encode(pixels, req)  # one image for every prompt of the request
        dtype = cfg.latent_dtype(self.components)
        noise = torch.randn(cfg.latent_shape(req, self.components), generator=req.generator, dtype=dtype, device="cpu")
        init = cfg.pack_latents(torch.cat([z] * req.batch_size).to(req.device, dtype), req)
        noise = cfg.pack_latents(noise.to(req.device), req)
        req.latents = req.scheduler.scale_noise(init, req.timesteps[:1].repeat(req.batch_size), noise)
        req.init_latents, req.init_noise = init, noise
        return req

    def encode(self, pixels: torch.Tensor, req: Request) -> torch.Tensor:
        """The picture's normalised latents (the config's ``encode_init_image``: a posterior sample)."""
        return self.config.encode_init_image(self.components, pixels, req)


class InpaintValidationStage(InputValidationStage):
    """Input validation, and the mask in either convention (``diffcore.masks``), so a bad mask is refused
    when the request arrives."""

    outputs = InputValidationStage.outputs + (Out("mask"),)

    def forward(self, req: Request) -> Request:
        from ..masks import check_fits, load_mask

        req = super().forward(req)
        req.mask = load_mask(req.params.mask)
        check_fits(req.mask, req.images[0])
        pad = getattr(req.params, "padding_mask_crop", None)
        if pad is not None:  # paint the box around the mask at the full output size (diffcore.mask_crop)
            from ..mask_crop import crop

            picture = req.images[0]
            if req.mask.size != picture.size:
                raise SamplingParamError("mask", f"with padding_mask_crop the mask must have the picture's size "
                                                 f"({picture.size[0]}x{picture.size[1]}), got "
                                                 f"{req.mask.size[0]}x{req.mask.size[1]}")
            cropped, req.mask, _ = crop(picture, req.mask, req.width, req.height, pad)
            req.images = [cropped] + list(req.images[1:])
            req.extra["paste_size"] = picture.size  # the result's size: requests batch only with the same
        return req


class MaskPreparationStage(PipelineStage):
    """The mask at latent resolution, one value per latent channel, packed like the latents (1 = repaint).
    ``mode``: how the binarised pixel mask is brought to latent size (``torch.nn.functional.interpolate``):
    diffusers' FLUX.1 / Qwen-Image inpaint use ``"nearest"``, FLUX.2 [klein] ``"bilinear"`` (a soft edge)."""

    inputs = (In("mask"), In("latents", torch.Tensor), In("height", int), In("width", int))
    outputs = (Out("latent_mask", torch.Tensor),)
    batch = "each"

    def __init__(self, config, components: dict, mode: str = "nearest"):
        super().__init__()
        self.config, self.components, self.mode = config, components, mode

    def forward(self, req: Request) -> Request:
        from ..masks import mask_tensor

        shape = self.config.latent_shape(req, self.components)
        h, w = shape[-2:]
        m = torch.nn.functional.interpolate(mask_tensor(req.mask, req.height, req.width), size=(h, w), mode=self.mode)
        m = m.view([1] * (len(shape) - 2) + [h, w]).expand(shape).contiguous()
        req.latent_mask = self.config.pack_latents(m.to(req.device, req.latents.dtype), req)
        return req


class InpaintBlendStage(PipelineStage):
    """Make the request's scheduler re-impose the kept region after every step (``MaskedSteps``)."""

    inputs = (In("scheduler"), In("timesteps", torch.Tensor), In("init_latents", torch.Tensor),
              In("init_noise", torch.Tensor), In("latent_mask", torch.Tensor))
    outputs = (Out("scheduler"),)
    batch = "rows"  # over the merged rows: every row's own picture, noise and mask

    def forward(self, req: Request) -> Request:
        req.scheduler = MaskedSteps(req.scheduler, req.timesteps, req.init_latents, req.init_noise, req.latent_mask)
        return req


class MaskedSteps:
    """A request's scheduler whose ``step`` is followed by diffusers' inpaint blend:
    ``(1 - mask) * init_re-noised_to_next_t + mask * latents``. It wraps the scheduler rather than the
    loop, so every denoising loop (CFG, parallel, step caches) inpaints unchanged."""

    def __init__(self, scheduler, timesteps, init, noise, mask):
        self.scheduler, self.timesteps, self.init, self.noise, self.mask = scheduler, timesteps, init, noise, mask
        self.calls = 0

    def step(self, model_output, timestep, sample, *args, **kwargs):
        latents = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        i, self.calls = self.calls, self.calls + 1
        kept = self.init
        if i < len(self.timesteps) - 1:
            kept = self.scheduler.scale_noise(self.init, self.timesteps[i + 1:i + 2], self.noise)
        return (1 - self.mask) * kept + self.mask * latents

    def predicted_x0(self, model_output, timestep, sample):
        """The prediction where the mask repaints, the input picture's latents where it keeps."""
        x0 = self.scheduler.predicted_x0(model_output, timestep, sample)
        return (1 - self.mask) * self.init + self.mask * x0

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


class MaskOverlayStage(PipelineStage):
    """``padding_mask_crop``: every such row's painted crop pasted back into its original picture, which stays
    on top wherever its mask is black (diffcore.mask_crop; rows of one batch have one original size)."""

    inputs = (In("output", required=False), In("height", int), In("width", int))
    outputs = (Out("output", required=False),)
    batch = "rows"

    def forward(self, req: Request) -> Request:
        from ..mask_crop import crop_region, paste_back
        from ..masks import load_mask
        from ..outputs import to_pil
        from .input_validation import load_image

        rows = req.row_params or [req.params] * req.batch_size
        if req.output is None or all(getattr(p, "padding_mask_crop", None) is None for p in rows):
            return req
        pasted, loaded = [], {}
        for i, p in enumerate(rows):
            if id(p) not in loaded:  # each request's own picture and mask, as it passed them
                loaded[id(p)] = (load_image(p.images[0], 0), load_mask(p.mask))
            picture, mask = loaded[id(p)]
            box = crop_region(mask, req.width, req.height, p.padding_mask_crop)
            pasted.append(np.asarray(paste_back(mask, picture, to_pil(req.output[i].float().cpu()), box)))
        req.output = torch.from_numpy(np.stack(pasted).astype(np.float32) / 255.0).to(req.output.device)
        return req


def rewrite(pipeline, inpaint: bool) -> None:
    """Turn a text-to-image composition into image-to-image (or inpainting): ``latent_preparation``
    (noise) becomes ``strength`` + ``init_latents`` (+ ``mask_preparation`` + ``inpaint_blend``); inpainting
    validates the mask with the other inputs. Call it at the end of ``create_pipeline_stages``."""
    cfg, c = pipeline.config, pipeline.components
    stages, pipeline.stages = pipeline.stages, []
    for stage in stages:
        if stage.name == "input_validation" and inpaint:
            pipeline.add_stage("input_validation", InpaintValidationStage(cfg, c))
        elif stage.name == "latent_preparation":
            pipeline.add_stage("strength", StrengthStage())
            pipeline.add_stage("init_latents", InitLatentsStage(cfg, c))
            if inpaint:
                pipeline.add_stage("mask_preparation", MaskPreparationStage(cfg, c))
                pipeline.add_stage("inpaint_blend", InpaintBlendStage())
        else:
            pipeline.stages.append(stage)
    if inpaint and pipeline.crops_to_mask:
        pipeline.add_stage("mask_overlay", MaskOverlayStage())


class Img2ImgComposition:
    """Mixin: ``class FluxImg2ImgPipeline(Img2ImgComposition, FluxPipeline)`` is the text-to-image stage list
    ``rewrite``-n for image-to-image; ``InpaintComposition`` for inpainting."""

    task = IMG2IMG

    def create_pipeline_stages(self, engine_args) -> None:
        super().create_pipeline_stages(engine_args)
        rewrite(self, inpaint=self.task == INPAINT)


class InpaintComposition(Img2ImgComposition):
    task = INPAINT
