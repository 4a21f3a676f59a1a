"""Wan pipelines: short compositions of the core stages (the model specifics live in configs.py)."""
from __future__ import annotations

import torch

from diffcore.errors import RegistryError
from diffcore.pipeline import ComposedPipelineBase
from diffcore.request import Request
from diffcore.stages import (CausalDMDDenoisingStage, ConditioningStage, DecodingStage, DenoisingStage,
                             DmdDenoisingStage, ImageEncodingStage, ImageVAEEncodingStage, In, InputValidationStage,
                             LatentPreparationStage, Out, PipelineStage, TextEncodingStage, TimestepPreparationStage)


class FirstFrameStage(PipelineStage):
    """TI2V with an image: the final first latent frame is the clean image latent (as in diffusers)."""

    inputs = (In("latents", torch.Tensor), In("image_latents", required=False))
    outputs = (Out("latents", torch.Tensor),)
    batch = "rows"

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, req: Request) -> Request:
        if self.config.first_frame(req):
            req.latents = self.config.apply_first_frame(req.latents, req)
        return req


def _denoiser(pipe, engine_args) -> DenoisingStage:
    c = pipe.components
    return DenoisingStage(pipe.config, [c.get("transformer"), c.get("transformer_2")], engine_args)


WAN_TRANSFORMERS = ("WanTransformer3DModel", "CausalWanTransformer3DModel")


class WanPipeline(ComposedPipelineBase):
    """Wan 2.1 T2V, Wan 2.2 T2V-A14B (two experts) and Wan 2.2 TI2V-5B (optional first-frame image)."""

    pipeline_name = "WanPipeline"
    _required_config_modules = ("tokenizer", "text_encoder", "transformer", "transformer_2", "vae", "scheduler")
    component_classes = {"vae": ("AutoencoderKLWan",), "transformer": WAN_TRANSFORMERS, "transformer_2": WAN_TRANSFORMERS}

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        if cfg.expand_timesteps:
            self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c, required=False))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", _denoiser(self, engine_args))
        if cfg.expand_timesteps:
            self.add_stage("first_frame", FirstFrameStage(cfg))
        self.add_stage("decoding", DecodingStage(cfg, c))


class WanImageToVideoPipeline(ComposedPipelineBase):
    """Wan 2.1 I2V (CLIP image tokens + first-frame latents) and Wan 2.2 I2V-A14B (two experts, no CLIP)."""

    pipeline_name = "WanImageToVideoPipeline"
    component_classes = WanPipeline.component_classes
    _required_config_modules = ("tokenizer", "text_encoder", "image_encoder", "image_processor", "transformer",
                                "transformer_2", "vae", "scheduler")

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        wants_clip = (c.get("transformer") or c["transformer_2"]).config.get("image_dim") is not None
        if wants_clip and (c.get("image_encoder") is None or c.get("image_processor") is None):
            raise RegistryError("WanImageToVideoPipeline: the transformer takes CLIP image tokens (image_dim is set) "
                                "but model_index.json has no image_encoder / image_processor")
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        if wants_clip:
            self.add_stage("image_encoding", ImageEncodingStage(cfg, c))
        self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c, required=not cfg.expand_timesteps))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", _denoiser(self, engine_args))
        if cfg.expand_timesteps:  # TI2V-5B weights saved as an image-to-video pipeline
            self.add_stage("first_frame", FirstFrameStage(cfg))
        self.add_stage("decoding", DecodingStage(cfg, c))


class WanDMDPipeline(ComposedPipelineBase):
    """Few-step distilled Wan (FastWan 2.1 T2V, FastWan 2.2 TI2V-5B, TurboWan 2.1 T2V / 2.2 I2V): the Wan
    stages with DmdDenoisingStage in place of the scheduler loop; the config's ``dmd`` recipe rules."""

    pipeline_name = "WanDMDPipeline"
    component_classes = WanPipeline.component_classes
    _required_config_modules = ("tokenizer", "text_encoder", "image_encoder", "image_processor", "transformer",
                                "transformer_2", "vae")

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        model = c.get("transformer") or c["transformer_2"]
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        if cfg.concat_condition and model.config.get("image_dim") is not None:
            self.add_stage("image_encoding", ImageEncodingStage(cfg, c))
        if cfg.concat_condition or cfg.expand_timesteps:
            self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c, required=cfg.concat_condition))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DmdDenoisingStage(cfg, [c.get("transformer"), c.get("transformer_2")], engine_args))
        if cfg.expand_timesteps:
            self.add_stage("first_frame", FirstFrameStage(cfg))
        self.add_stage("decoding", DecodingStage(cfg, c))


class WanCausalDMDPipeline(ComposedPipelineBase):
    """Self-forcing causal Wan T2V: blocks of latent frames denoised in order against a KV cache of the
    earlier ones, each decoded as soon as it is done (``block_callback``), so video can stream."""

    pipeline_name = "WanCausalDMDPipeline"
    component_classes = WanPipeline.component_classes
    _required_config_modules = ("tokenizer", "text_encoder", "transformer", "vae")

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", CausalDMDDenoisingStage(cfg, [c["transformer"]], engine_args, components=c))
