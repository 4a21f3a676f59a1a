"""Qwen-Image pipelines: short compositions of the core stages; the model specifics live in configs.py."""
from __future__ import annotations

import logging

import torch

from diffcore.notices import notice
from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, ImageVAEEncodingStage, In,
                             InputValidationStage, LatentPreparationStage, Out, PipelineStage, TextEncodingStage,
                             TimestepPreparationStage)
from diffcore.stages.image_to_image import Img2ImgComposition, InpaintComposition

log = logging.getLogger(__name__)


class QwenImagePipeline(ComposedPipelineBase):
    """Text-to-image: Qwen2.5-VL prompt embeddings -> MMDiT with true CFG -> 3D VAE (frame 0)."""

    pipeline_name = "QwenImagePipeline"
    component_classes = {"transformer": ("QwenImageTransformer2DModel",), "vae": ("AutoencoderKLQwenImage",)}
    _required_config_modules = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
    edit = False

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        # Edit: the VL model reads the prompt together with the input image(s).
        self.add_stage("text_encoding", TextEncodingStage(cfg, c, needs_images=self.edit))
        if self.edit:  # input image(s) at ~1 MP -> latent tokens appended to the generated image's
            self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit: one input image. The tokenizer comes with the processor (image processor + tokenizer)."""

    pipeline_name = "QwenImageEditPipeline"
    _required_config_modules = ("processor", "text_encoder", "transformer", "vae", "scheduler")
    edit = True


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 / 2511: one to three input images."""

    pipeline_name = "QwenImageEditPlusPipeline"


class QwenImageImg2ImgPipeline(Img2ImgComposition, QwenImagePipeline):
    """Image-to-image on a Qwen-Image checkpoint (diffusers' QwenImageImg2ImgPipeline): ``image`` + ``strength``."""


class QwenImageInpaintPipeline(InpaintComposition, QwenImagePipeline):
    """Inpainting on a Qwen-Image checkpoint (diffusers' QwenImageInpaintPipeline): ``image`` + ``mask`` + ``strength``."""

    crops_to_mask = True  # padding_mask_crop, as diffusers'


class EditInpaintSizeStage(PipelineStage):
    """Edit-inpainting works at the input image's own ~1 MP size (as diffusers, which ignores height/width):
    the repainted picture is also the condition the edit model reads."""

    inputs = (In("images", list),)
    outputs = (Out("height", int), Out("width", int))
    batch = "each"

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, req):
        h, w = self.config.vae_size(req.images[0])
        m = self.config.size_multiple
        if (req.params.height, req.params.width) not in ((None, None), (h // m * m, w // m * m)):
            notice(log, "height/width are ignored: edit-inpainting works at the input image's size, %dx%d", w // m * m, h // m * m,
                   ignored="height")
        req.height, req.width = h // m * m, w // m * m
        return req


class ConditionFromInitStage(PipelineStage):
    """The edit condition tokens are the input picture's latents that inpainting starts from (diffusers)."""

    inputs = (In("init_latents", torch.Tensor),)
    outputs = (Out("image_latents", torch.Tensor),)
    batch = "each"

    def forward(self, req):
        req.image_latents = req.init_latents
        return req


class QwenImageEditInpaintPipeline(InpaintComposition, QwenImageEditPipeline):
    """Edit-inpainting on a Qwen-Image-Edit checkpoint (diffusers' QwenImageEditInpaintPipeline): the edit
    instruction applied inside ``mask`` only; ``strength`` defaults to 1 there."""

    default_strength = 1.0

    def create_pipeline_stages(self, engine_args) -> None:
        super().create_pipeline_stages(engine_args)
        stages, self.stages = self.stages, []
        for stage in stages:
            if stage.name == "image_vae_encoding":
                continue
            self.stages.append(stage)
            if stage.name == "input_validation":
                self.add_stage("edit_inpaint_size", EditInpaintSizeStage(self.config))
            if stage.name == "init_latents":
                self.add_stage("condition_from_init", ConditionFromInitStage())


class QwenImageLayeredPipeline(ComposedPipelineBase):
    """Qwen-Image-Layered: one RGBA picture in, ``layers`` RGBA layers out (diffcore_qwen.layered)."""

    pipeline_name = "QwenImageLayeredPipeline"
    component_classes = QwenImagePipeline.component_classes
    _required_config_modules = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")

    def create_pipeline_stages(self, engine_args) -> None:
        from .captioning import CaptionStage
        from .layered import LayeredDecodingStage, LayeredInputValidationStage

        c, cfg = self.components, self.config
        self.add_stage("input_validation", LayeredInputValidationStage(cfg, c))
        self.add_stage("captioning", CaptionStage(cfg, c))  # an empty prompt: the picture's caption
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", LayeredDecodingStage(cfg, c))
