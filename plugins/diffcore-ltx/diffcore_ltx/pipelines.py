"""LTX-2 pipelines: the core stages plus three of the family's own (``stages.py``).

    input_validation -> text_encoding -> timestep_preparation -> latent_preparation [-> image_conditioning]
      -> conditioning -> denoising (core loop and guidance hooks, LTX2Denoiser) -> decoding (video) -> audio_decoding

The audio decoding stage declares ``audio`` / ``audio_sample_rate`` outputs, which the config's ``has_audio``
makes the build-time dataflow proof require.
"""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import ConditioningStage, DecodingStage, DenoisingStage, TextEncodingStage

from .guidance import LTX2Denoiser
from .stages import (AudioDecodingStage, ImageConditioningStage, LTX2InputValidationStage, LTX2LatentPreparationStage,
                     LTX2TimestepPreparationStage)


class LTX2Pipeline(ComposedPipelineBase):
    """Text-to-video with a synchronized stereo sound track."""

    pipeline_name = "LTX2Pipeline"
    component_classes = {"transformer": ("LTX2VideoTransformer3DModel",), "vae": ("AutoencoderKLLTX2Video",),
                         "audio_vae": ("AutoencoderKLLTX2Audio",)}
    _required_config_modules = ("text_encoder", "tokenizer", "connectors", "transformer", "vae", "audio_vae",
                                "vocoder", "scheduler")

    def create_pipeline_stages(self, engine_args) -> None:
        self.check_engine(engine_args)
        c, cfg = self.components, self.config
        self.denoiser = LTX2Denoiser(c["transformer"])
        self.add_stage("input_validation", LTX2InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", LTX2TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LTX2LatentPreparationStage(cfg, c))
        self.add_image_stages()
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [self.denoiser], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))
        self.add_stage("audio_decoding", AudioDecodingStage(cfg, c))

    def add_image_stages(self) -> None:
        """Text-to-video has none."""

    @staticmethod
    def check_engine(engine_args) -> None:
        """What the LTX-2 denoiser does not take part in yet, refused rather than silently ignored. CFG parallelism
        works through the core (its two ranks share a step's guidance branches); sequence parallelism is refused by
        the core (``sequence_parallel`` is false: the transformer does not shard its two token streams)."""
        from diffcore.errors import ConfigError

        if engine_args.cache:
            raise ConfigError("LTX2Pipeline: step caches (cache=...) are not supported by the LTX-2 denoiser: the "
                              "core's block caches key on one token stream and one residual per step, LTX-2 has two "
                              "streams and up to four guidance branches per step")


class LTX2ImageToVideoPipeline(LTX2Pipeline):
    """Image-to-video with sound: the first latent frame is the encoded image, kept clean (timestep 0)."""

    pipeline_name = "LTX2ImageToVideoPipeline"

    def add_image_stages(self) -> None:
        self.add_stage("image_conditioning", ImageConditioningStage(self.config, self.components))
