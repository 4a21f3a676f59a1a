"""LTX-2 configs: the hooks the core stages call, and the sampling parameters (diffusers' call-argument names).

The request's latents are one float32 row per video: the packed video tokens (F' x H' x W' x 128) and then
the packed audio tokens (T x 8 x 16), flattened side by side (``layout.py``). Both streams follow the same
sigmas (diffusers steps a copy of the scheduler for audio with the same schedule), so one Euler step on the
joint row is exactly the two steps. Guidance (CFG, STG, modality isolation, rescale, in x0 space) runs through
the core's guidance hooks: ``wants_cfg``, ``guidance_branches`` (the extra calls) and ``combine_predictions``
(``guidance.py``).
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import attrs
import torch

from diffcore.configs import PipelineConfig, SamplingParams, ranges
from diffcore.configs.sampling_params import non_negative_float
from diffcore.errors import SamplingParamError
from diffcore.request import PromptEmbeds

from .layout import Layout


def _frame_rate(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SamplingParamError(attribute.name, f"must be a finite number > 0, got {value!r}")
    problem = ranges.frame_rate_problem(value)
    if problem:
        raise SamplingParamError(attribute.name, problem)


def _optional_scale(inst, attribute, value):
    if value is not None:
        non_negative_float(inst, attribute, value)


def _blocks(inst, attribute, value):
    if not isinstance(value, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in value):
        raise SamplingParamError(attribute.name, f"expected a list of transformer block indices, got {value!r}")


def _sigmas(inst, attribute, value):
    if value is None:
        return
    ok = isinstance(value, (list, tuple)) and value and all(
        not isinstance(s, bool) and isinstance(s, (int, float)) and 0 < s <= 1 for s in value)
    if not ok or any(b >= a for a, b in zip(value, value[1:])):
        raise SamplingParamError(attribute.name, f"expected a strictly decreasing list of sigmas in (0, 1], got {value!r}")


# The 8-step schedule of LTX-2 distilled (diffusers' DISTILLED_SIGMA_VALUES), used with guidance 1.
DISTILLED_SIGMA_VALUES = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)


@attrs.define(kw_only=True)
class LTX2SamplingParams(SamplingParams):
    height: int = 512
    width: int = 768
    num_frames: int = 121
    frame_rate: float = attrs.field(default=24.0, validator=_frame_rate)
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    stg_scale: float = attrs.field(default=1.0, validator=non_negative_float)
    modality_scale: float = attrs.field(default=3.0, validator=non_negative_float)
    guidance_rescale: float = attrs.field(default=0.7, validator=non_negative_float)
    # None: the video value (diffusers: ``audio_guidance_scale or guidance_scale``)
    audio_guidance_scale: Optional[float] = attrs.field(default=7.0, validator=_optional_scale)
    audio_stg_scale: Optional[float] = attrs.field(default=1.0, validator=_optional_scale)
    audio_modality_scale: Optional[float] = attrs.field(default=3.0, validator=_optional_scale)
    audio_guidance_rescale: Optional[float] = attrs.field(default=0.7, validator=_optional_scale)
    spatio_temporal_guidance_blocks: list = attrs.field(factory=lambda: [28], validator=_blocks)
    sigmas: Optional[list] = attrs.field(default=None, validator=_sigmas)
    use_cross_timestep: bool = True
    max_sequence_length: int = 1024
    max_sequence_length_limit: ClassVar[Optional[int]] = None
    max_images: ClassVar[int] = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.fps is None:  # the mp4's frame rate
            self.fps = max(1, round(self.frame_rate))
        if self.sigmas is not None and len(self.sigmas) != self.num_inference_steps:
            if self.num_inference_steps == attrs.fields(type(self)).num_inference_steps.default:
                self.num_inference_steps = len(self.sigmas)
            else:
                raise SamplingParamError("sigmas", f"{len(self.sigmas)} sigmas for num_inference_steps="
                                                   f"{self.num_inference_steps}; give one sigma per step")

    def audio(self, name: str) -> float:
        value = getattr(self, f"audio_{name}")
        return value if value else getattr(self, name)  # diffusers' `or`: 0 and None fall back


def _crf(inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 51):
        raise SamplingParamError(attribute.name, f"expected an H.264 CRF from 0 (no re-compression) to 51, got {value!r}")


@attrs.define(kw_only=True)
class LTX2ImageToVideoSamplingParams(LTX2SamplingParams):
    """``image``: the first frame. ``image_crf``: re-compress it through H.264 at this CRF before encoding, as the
    model saw images in training (None: 33, the LTX-2.0/2.3 value; 0: no re-compression)."""

    width: int = 704
    num_frames: int = 161
    image_crf: Optional[int] = attrs.field(default=None, validator=_crf)
    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class LTX2DistilledSamplingParams(LTX2SamplingParams):
    """LTX-2 distilled: its 8 fixed sigmas and no guidance (diffusers' documented distilled call)."""

    num_inference_steps: int = 8
    sigmas: Optional[list] = attrs.field(factory=lambda: list(DISTILLED_SIGMA_VALUES), validator=_sigmas)
    guidance_scale: float = 1.0
    stg_scale: float = attrs.field(default=0.0, validator=non_negative_float)
    modality_scale: float = attrs.field(default=1.0, validator=non_negative_float)
    guidance_rescale: float = attrs.field(default=0.0, validator=non_negative_float)
    audio_guidance_scale: Optional[float] = attrs.field(default=1.0, validator=_optional_scale)
    audio_stg_scale: Optional[float] = attrs.field(default=0.0, validator=_optional_scale)
    audio_modality_scale: Optional[float] = attrs.field(default=1.0, validator=_optional_scale)
    audio_guidance_rescale: Optional[float] = attrs.field(default=0.0, validator=_optional_scale)


@attrs.define(kw_only=True)
class LTX2Config(PipelineConfig):
    default_dtype: str = "bfloat16"
    vae_scale_factor: int = 32
    vae_temporal_factor: int = 8
    latent_patch: int = 1  # the transformer's patch size is 1: a latent voxel is a token
    cfg: str = "cfg"  # negatives are encoded when any CFG scale (video or audio) is active: ``wants_cfg``
    default_negative_prompt: str = ""
    is_video: bool = True
    default_fps: Optional[int] = 24
    has_audio: ClassVar[bool] = True
    previews: ClassVar[bool] = False  # the latents hold video and audio tokens (diffcore.previews)
    step_rows: ClassVar[bool] = False  # its guided denoiser takes one timestep per call: start-only batches
    required_frames_step: ClassVar[int] = 8

    def default_size(self, components) -> tuple[int, int]:
        return 512, 768

    def resolve_size(self, req, components) -> None:
        super().resolve_size(req, components)
        frames = req.params.num_frames or 121
        k = self.vae_temporal_factor
        if (frames - 1) % k:
            lower = (frames - 1) // k * k + 1
            raise SamplingParamError("num_frames", f"num_frames={frames} is not {k}k + 1 (the video VAE codes the "
                                                   f"first frame alone, then blocks of {k}); use {lower} or {lower + k}")
        req.num_frames = frames

    def layout(self, req, components) -> Layout:
        return Layout.of(req, components, self)

    def image_seq_len(self, req) -> int:
        """The video token count (diffusers computes the schedule's shift ``mu`` from it)."""
        s = self.vae_scale_factor
        return ((req.num_frames - 1) // self.vae_temporal_factor + 1) * (req.height // s) * (req.width // s)

    # ---- text ----------------------------------------------------------------------------------
    def encode_prompts(self, components: dict, prompts: list[str], req) -> PromptEmbeds:
        """All of Gemma's hidden states (embeddings + every layer), stacked layer-fastest and flattened
        (B, S, D * L), with the tokenizer's mask; prompts left-padded to max_sequence_length."""
        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokens = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=req.params.max_sequence_length,
                           truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)
        with torch.inference_mode():
            states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        embeds = torch.stack(states, dim=-1).flatten(2, 3).to(encoder.dtype)
        return PromptEmbeds(embeds=embeds.to(req.device), mask=mask.to(req.device))

    # ---- denoising ------------------------------------------------------------------------------
    def prepare_condition(self, components: dict, req) -> dict:
        from .guidance import condition

        return condition(self, components, req)

    def wants_cfg(self, params) -> bool:
        """CFG runs when the video *or* the audio guidance scale is above 1 (diffusers' do_classifier_free_guidance)."""
        return params.guidance_scale > 1.0 or params.audio("guidance_scale") > 1.0

    def guidance_branches(self, req, step: int, t) -> tuple[str, ...]:
        """The STG and modality-isolation calls, when some row's scale makes them matter (``guidance.condition``)."""
        return tuple(name for name in ("stg", "modality") if name in req.condition)

    def merge_branches(self, branches: list, req):
        """CFG as one call on [negative, positive] (diffusers' batching): the branches differ only in their text
        contexts; the rest (layout, RoPE tables, frame rate) is the same object in each."""
        from .guidance import merge

        return merge(branches)

    def combine_predictions(self, preds: dict, rows: list, latents, t, req, expert: int):
        from .guidance import combine

        return combine(self, preds, rows, latents, t, req)

    def model_timestep(self, t, latents, req):
        return t.expand(latents.shape[0])  # LTX-2 takes the 0-1000 timestep itself

    def batch_key(self, req) -> tuple:
        p = req.params
        return (p.frame_rate, tuple(p.spatio_temporal_guidance_blocks), p.use_cross_timestep,
                tuple(p.sigmas) if p.sigmas else None, len(req.images or ()))

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, components: dict, latents: torch.Tensor, req) -> torch.Tensor:
        vae = components["vae"]
        video = self.layout(req, components).video(latents)
        z = video * vae.latents_std.view(1, -1, 1, 1, 1).to(video) / vae.scaling_factor \
            + vae.latents_mean.view(1, -1, 1, 1, 1).to(video)
        return self.to_pixels(vae.decode(z.to(vae.dtype)))

    def decode_audio(self, components: dict, latents: torch.Tensor, req) -> tuple[torch.Tensor, int]:
        """The audio tokens -> de-normalised latents -> mel spectrogram -> waveform (B, channels, samples)."""
        audio_vae, vocoder = components["audio_vae"], components["vocoder"]
        layout = self.layout(req, components)
        tokens = layout.audio_tokens(latents)
        tokens = tokens * audio_vae.latents_std.to(tokens) + audio_vae.latents_mean.to(tokens)
        mel = audio_vae.decode(layout.unpack_audio(tokens).to(audio_vae.dtype))
        return vocoder(mel.to(vocoder.dtype)).float(), int(vocoder.output_sampling_rate)


@attrs.define(kw_only=True)
class LTX2DistilledImageToVideoSamplingParams(LTX2DistilledSamplingParams):
    """The distilled schedule with LTX2ImageToVideoSamplingParams' image fields."""

    width: int = 704
    num_frames: int = 161
    image_crf: Optional[int] = attrs.field(default=None, validator=_crf)
    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1


def is_distilled(model_index, folder) -> bool:
    """A distilled LTX-2 folder: its scheduler has no dynamic shifting (diffusers' converter writes it so)."""
    import json
    from pathlib import Path

    path = Path(folder) / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text()).get("use_dynamic_shifting") is False
    except (OSError, ValueError):
        return False
