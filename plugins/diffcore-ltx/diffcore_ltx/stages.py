"""The LTX-2 family's own stages: what the generic ones cannot do for two latent streams and a sound track."""
from __future__ import annotations

import numpy as np
import torch

from diffcore.errors import SamplingParamError
from diffcore.request import Request
from diffcore.stages import InputValidationStage, TimestepPreparationStage
from diffcore.stages.base import In, Out, PipelineStage


class LTX2InputValidationStage(InputValidationStage):
    """The core checks (CFG when the video or the audio scale is above 1: ``LTX2Config.wants_cfg``), plus LTX-2's:
    num_frames 8k + 1 (in ``LTX2Config.resolve_size``), registers, STG block indices."""

    def forward(self, req: Request) -> Request:
        req = super().forward(req)
        p = req.params
        registers = getattr(getattr(self.components.get("connectors"), "video_connector", None), "num_registers", None)
        if registers and p.max_sequence_length % registers:
            n = max(registers, p.max_sequence_length // registers * registers)
            raise SamplingParamError("max_sequence_length", f"{p.max_sequence_length} is not a multiple of the text "
                                                            f"connectors' {registers} registers; use e.g. {n}")
        blocks = self.components["transformer"].config.get("num_layers", 48)
        stg = p.stg_scale > 0 or p.audio("stg_scale") > 0
        if stg and any(b >= blocks for b in p.spatio_temporal_guidance_blocks):
            raise SamplingParamError("spatio_temporal_guidance_blocks",
                                     f"{list(p.spatio_temporal_guidance_blocks)}: this transformer has {blocks} blocks "
                                     f"(0 to {blocks - 1}); pass block indices below {blocks} or stg_scale=0")
        return req


class LTX2TimestepPreparationStage(TimestepPreparationStage):
    """The core schedule, or the request's own ``sigmas`` (the distilled 8-step schedule)."""

    def forward(self, req: Request) -> Request:
        sigmas = req.params.sigmas
        if sigmas is None:
            return super().forward(req)
        import copy

        scheduler = copy.deepcopy(self.scheduler)
        kwargs = {"sigmas": np.asarray(sigmas, dtype=np.float32)}
        if getattr(scheduler, "config", {}).get("use_dynamic_shifting"):
            kwargs["mu"] = scheduler.compute_mu(self.config.image_seq_len(req))
        scheduler.set_timesteps(len(sigmas), device=req.device, **kwargs)
        req.scheduler, req.timesteps = scheduler, scheduler.timesteps
        return req


class LTX2LatentPreparationStage(PipelineStage):
    """Video noise, then audio noise, from the request's generator (diffusers' order), packed into joint rows."""

    inputs = (In("height", int), In("width", int), In("num_frames", int), In("generator", torch.Generator))
    outputs = (Out("latents", torch.Tensor),)
    batch = "each"

    def __init__(self, config, components: dict, name: str = "latent_preparation"):
        super().__init__(name)
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        layout = self.config.layout(req, self.components)
        b = req.batch_size
        video = torch.randn((b, layout.channels, layout.frames, layout.height, layout.width), generator=req.generator)
        audio = torch.randn((b, layout.audio_channels, layout.audio_frames, layout.mel_bins), generator=req.generator)
        req.latents = layout.join(layout.pack_video(video), layout.pack_audio(audio)).to(req.device)
        return req


class ImageConditioningStage(PipelineStage):
    """Image-to-video: the image (H.264 re-compressed at ``image_crf``, resized to the video) is VAE-encoded and
    replaces latent frame 0; those tokens stay clean (their timestep is 0, their velocity 0)."""

    inputs = (In("images", list), In("latents", torch.Tensor), In("height", int), In("width", int))
    outputs = (Out("image_latents", torch.Tensor), Out("latents", torch.Tensor))
    batch = "each"

    def __init__(self, config, components: dict, name: str = "image_conditioning"):
        super().__init__(name)
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        from .image import preprocess

        vae, layout = self.components["vae"], self.config.layout(req, self.components)
        pixels = preprocess(req.images[0], req.height, req.width, req.params.image_crf).to(req.device, vae.dtype)
        z = vae.encode(pixels[:, :, None]).mode()  # (1, C, 1, h, w)
        z = (z - vae.latents_mean.view(1, -1, 1, 1, 1).to(z)) / vae.latents_std.view(1, -1, 1, 1, 1).to(z)
        first = layout.pack_video(z.float()).expand(req.batch_size, -1, -1)  # frame 0's tokens
        video, audio = layout.split(req.latents)
        video = torch.cat([first, video[:, first.shape[1]:]], dim=1)
        req.latents = layout.join(video, audio)
        req.image_latents = first
        return req


class AudioDecodingStage(PipelineStage):
    """Audio tokens -> audio VAE (mel) -> vocoder: the request's sound track."""

    inputs = (In("latents", torch.Tensor), In("num_frames", int))
    outputs = (Out("audio", torch.Tensor, required=False), Out("audio_sample_rate", int, required=False))
    batch = "rows"

    def __init__(self, config, components: dict, name: str = "audio_decoding"):
        super().__init__(name)
        self.config, self.components = config, components

    @torch.inference_mode()
    def forward(self, req: Request) -> Request:
        if req.params.output_type == "latent":
            return req
        req.audio, req.audio_sample_rate = self.config.decode_audio(self.components, req.latents, req)
        return req
