"""Z-Image pipelines: short compositions of diffcore's standard stages.

The model-specific work happens in the config's hooks (``configs.py``); diffcore proves at build time that
each stage's inputs are produced by the request or an earlier stage. Image-to-image is the core's rewrite of
the text-to-image list (``strength`` + ``init_latents`` in place of the noise), served both by folders whose
``_class_name`` is ``ZImageImg2ImgPipeline`` and, per request (``image`` + ``strength``), by text-to-image ones.
"""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, InputValidationStage,
                             LatentPreparationStage, TextEncodingStage, TimestepPreparationStage)
from diffcore.stages.image_to_image import Img2ImgComposition, InpaintComposition


class ZImagePipeline(ComposedPipelineBase):
    """Text-to-image: Qwen3 prompt features -> single-stream DiT (CFG policy per step) -> AutoencoderKL."""

    pipeline_name = "ZImagePipeline"
    component_classes = {"transformer": ("ZImageTransformer2DModel",), "vae": ("AutoencoderKL",)}
    _required_config_modules = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))


class ZImageImg2ImgPipeline(Img2ImgComposition, ZImagePipeline):
    """Image-to-image (diffusers' ZImageImg2ImgPipeline): the input image's latents noised to ``strength``."""

    pipeline_name = "ZImageImg2ImgPipeline"


class ZImageInpaintPipeline(InpaintComposition, ZImagePipeline):
    """Inpainting on a ZImagePipeline folder (diffusers' ZImageInpaintPipeline): ``image`` + ``mask``; ``strength``
    defaults to 1 there."""

    default_strength = 1.0
