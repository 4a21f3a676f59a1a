"""ltx pipelines: short compositions of diffcore's standard stages.

The model-specific work happens in the config's hooks (LTX2Config); the
stages are the same for every family. diffcore proves at build time that each stage's inputs are
produced by the request or an earlier stage.
"""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, InputValidationStage,
                             LatentPreparationStage, TextEncodingStage, TimestepPreparationStage)


class LTX2Pipeline(ComposedPipelineBase):
    """Text-to-image: encode the prompt, draw noise, denoise with CFG, decode with the VAE."""

    pipeline_name = "LTX2Pipeline"
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


class LTX2ImageToVideoPipeline(LTX2Pipeline):
    """Serves LTX2ImageToVideoPipeline checkpoints; adapt its stages (e.g. add ImageVAEEncodingStage for image inputs)."""

    pipeline_name = "LTX2ImageToVideoPipeline"
