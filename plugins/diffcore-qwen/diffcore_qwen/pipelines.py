"""Qwen-Image pipelines: short compositions of the core stages; the model specifics live in configs.py."""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, ImageVAEEncodingStage,
                             InputValidationStage, LatentPreparationStage, TextEncodingStage,
                             TimestepPreparationStage)


class QwenImagePipeline(ComposedPipelineBase):
    """Text-to-image: Qwen2.5-VL prompt embeddings -> MMDiT with true CFG -> 3D VAE (frame 0)."""

    pipeline_name = "QwenImagePipeline"
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
