"""The toy pipeline: the same short composition of core stages a real family uses."""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, InputValidationStage,
                             LatentPreparationStage, TextEncodingStage, TimestepPreparationStage)


class ToyPipeline(ComposedPipelineBase):
    pipeline_name = "ToyPipeline"
    component_classes = {"transformer": ("ToyTransformer2DModel",), "vae": ("AutoencoderKL",)}
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
