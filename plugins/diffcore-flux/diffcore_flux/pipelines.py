"""FLUX.1 pipelines: short compositions of the core stages."""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, ImageVAEEncodingStage,
                             InputValidationStage, LatentPreparationStage, TextEncodingStage,
                             TimestepPreparationStage)

_MODULES = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae", "scheduler")


class FluxPipeline(ComposedPipelineBase):
    pipeline_name = "FluxPipeline"
    _required_config_modules = _MODULES

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], progress=engine_args.progress))
        self.add_stage("decoding", DecodingStage(cfg, c))


class FluxKontextPipeline(ComposedPipelineBase):
    pipeline_name = "FluxKontextPipeline"
    _required_config_modules = _MODULES

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], progress=engine_args.progress))
        self.add_stage("decoding", DecodingStage(cfg, c))
