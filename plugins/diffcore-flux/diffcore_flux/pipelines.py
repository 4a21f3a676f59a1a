"""FLUX.1 pipelines: short compositions of the core stages."""
from __future__ import annotations

from diffcore.pipeline import ComposedPipelineBase
from diffcore.stages import (ConditioningStage, DecodingStage, DenoisingStage, ImageVAEEncodingStage,
                             InputValidationStage, LatentPreparationStage, TextEncodingStage,
                             TimestepPreparationStage)
from diffcore.stages.image_to_image import (Img2ImgComposition, InitLatentsStage, InpaintComposition,
                                           InpaintValidationStage, StrengthStage)


class FluxPipeline(ComposedPipelineBase):
    """Text-to-image: CLIP + T5 prompt, packed latents, flow-matching Euler, AutoencoderKL decode."""

    pipeline_name = "FluxPipeline"
    component_classes = {"transformer": ("FluxTransformer2DModel",), "vae": ("AutoencoderKL",)}
    _required_config_modules = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae",
                                "scheduler")
    encodes_image = False

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        if self.encodes_image:
            self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))


class FluxKontextPipeline(FluxPipeline):
    """Image editing: the same chain plus the VAE-encoded input image, concatenated in sequence."""

    pipeline_name = "FluxKontextPipeline"
    encodes_image = True


class Flux2Pipeline(ComposedPipelineBase):
    """FLUX.2 [dev]: text-to-image, or editing with 1-10 reference images (``image=[...]``) appended as tokens."""

    pipeline_name = "Flux2Pipeline"
    component_classes = {"transformer": ("Flux2Transformer2DModel",), "vae": ("AutoencoderKLFlux2",)}
    _required_config_modules = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")

    def create_pipeline_stages(self, engine_args) -> None:
        c, cfg = self.components, self.config
        self.add_stage("input_validation", InputValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("image_vae_encoding", ImageVAEEncodingStage(cfg, c, required=False))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("latent_preparation", LatentPreparationStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))


class Flux2KleinPipeline(Flux2Pipeline):
    """FLUX.2 [klein] 4B / 9B, distilled (one pass) or base (CFG against the empty prompt)."""

    pipeline_name = "Flux2KleinPipeline"


class Flux2KleinKVPipeline(Flux2Pipeline):
    """FLUX.2 [klein] 9B-KV: the reference tokens run in the first step only; later steps reuse their K/V."""

    pipeline_name = "Flux2KleinKVPipeline"


class FluxImg2ImgPipeline(Img2ImgComposition, FluxPipeline):
    """Image-to-image on a FluxPipeline checkpoint (diffusers' FluxImg2ImgPipeline): ``image`` + ``strength``."""


class FluxInpaintPipeline(InpaintComposition, FluxPipeline):
    """Inpainting on a FluxPipeline checkpoint (diffusers' FluxInpaintPipeline): ``image`` + ``mask`` + ``strength``."""

    crops_to_mask = True  # padding_mask_crop, as diffusers'


class FluxFillPipeline(ComposedPipelineBase):
    """FLUX.1-Fill-dev: inpainting with the masked picture and the mask as extra transformer inputs (diffcore_flux.fill)."""

    pipeline_name = "FluxFillPipeline"
    component_classes = FluxPipeline.component_classes
    _required_config_modules = FluxPipeline._required_config_modules

    def create_pipeline_stages(self, engine_args) -> None:
        from .fill import FillConditionStage

        c, cfg = self.components, self.config
        self.add_stage("input_validation", InpaintValidationStage(cfg, c))
        self.add_stage("text_encoding", TextEncodingStage(cfg, c))
        self.add_stage("timestep_preparation", TimestepPreparationStage(cfg, c["scheduler"]))
        self.add_stage("strength", StrengthStage())
        self.add_stage("init_latents", InitLatentsStage(cfg, c))
        self.add_stage("fill_condition", FillConditionStage(cfg, c))
        self.add_stage("conditioning", ConditioningStage(cfg, c))
        self.add_stage("denoising", DenoisingStage(cfg, [c["transformer"]], engine_args))
        self.add_stage("decoding", DecodingStage(cfg, c))
