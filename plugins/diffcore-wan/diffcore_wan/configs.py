"""Wan 2.1 / 2.2 configs: UMT5 prompts, video latents (B, C, F, H, W), image conditioning, defaults.

One ``WanConfig`` serves every variant; the switches come from the checkpoint:

* ``expand_timesteps`` (model_index.json, Wan 2.2 TI2V-5B): an input image replaces the first latent
  frame and its tokens get timestep 0 ("first-frame" conditioning);
* ``concat_condition`` (the image-to-video configs): a 4-channel first-frame mask and the VAE latents
  of [image, black frames...] are concatenated to the noisy latents on the channel axis;
* ``boundary_ratio`` (model_index.json, Wan 2.2 A14B): two experts; ``select_denoiser`` tells the core
  DenoisingStage to switch to ``transformer_2`` below ``boundary_ratio * num_train_timesteps``, and
  ``guidance_scale_at`` gives that expert ``guidance_scale_2``.

Defaults follow the official Wan recipes (shared/reference/models.md section 4). The schedule is the
checkpoint's own scheduler_config.json, as in diffusers; the official recipes' flow shift is only a
recommendation (``recommended_flow_shift``, logged at load when the folder differs), applied per request
with ``generate(flow_shift=...)``.
"""
from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import ClassVar, Optional

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.configs.pipeline_config import row_scale
from diffcore.configs.sampling_params import guidance
from diffcore.errors import ConfigError, SamplingParamError
from diffcore.notices import notice
from diffcore.request import PromptEmbeds

log = logging.getLogger(__name__)

# The official Wan negative prompt (Wan2.1/Wan2.2 shared_config.py ``sample_neg_prompt``).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
# Wan 2.1 I2V-14B prefixes "camera shake" (wan_i2v_14B.py).
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT


# ---- prompt cleaning (diffusers' / Wan's prompt_clean) ----------------------------------------------
def prompt_clean(text: str) -> str:
    """ftfy.fix_text, html.unescape twice, strip, collapse whitespace: what Wan was trained with."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---- detection from a local folder ------------------------------------------------------------------
def _json(folder, *parts) -> dict:
    try:
        return json.loads(Path(folder, *parts).read_text())
    except (OSError, ValueError):
        return {}


def _transformer(folder) -> dict:
    return _json(folder, "transformer", "config.json") or _json(folder, "transformer_2", "config.json")


def _hidden(folder) -> int:
    t = _transformer(folder)
    return int(t.get("num_attention_heads", 0)) * int(t.get("attention_head_dim", 0))


def is_two_expert(model_index, folder) -> bool:
    return "transformer_2" in model_index.components or model_index.extra.get("boundary_ratio") is not None


def is_ti2v(model_index, folder) -> bool:
    return bool(model_index.extra.get("expand_timesteps")) or _json(folder, "vae", "config.json").get("z_dim") == 48


def is_t2v_14b(model_index, folder) -> bool:
    return not is_two_expert(model_index, folder) and not is_ti2v(model_index, folder) and _hidden(folder) == 5120


def is_i2v_720p(model_index, folder) -> bool:
    return "720p" in str(folder).lower() and not is_two_expert(model_index, folder)


# ---- the config -------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class WanConfig(PipelineConfig):
    """Wan 2.1 T2V 1.3B (480p, flow shift 3.0). Base of all Wan configs."""
    sequence_parallel: ClassVar[bool] = True  # the transformer shards its tokens (Ulysses)

    default_dtype: str = "bfloat16"
    component_dtypes: dict = attrs.field(factory=lambda: {"vae": "float32", "image_encoder": "float32"})
    vae_temporal_factor: int = 4
    latent_patch: int = 1  # no token packing: latents stay (B, C, F, H, W); the transformer patchifies
    spatial_patch: int = 2  # the transformer's patch_size[1:] (read from its config)
    linear_sigmas: bool = False  # diffusers: scheduler.set_timesteps(n) with the scheduler's flow sigmas
    cfg: str = "cfg"
    default_negative_prompt: Optional[str] = DEFAULT_NEGATIVE_PROMPT
    is_video: bool = True
    default_fps: Optional[int] = 16
    default_height: int = 480
    default_width: int = 832
    # The official recipe's flow shift: documentation and a load-time hint, never applied by itself.
    recommended_flow_shift: Optional[float] = 3.0
    expand_timesteps: bool = False
    concat_condition: bool = False
    boundary_ratio: Optional[float] = None  # two experts (Wan 2.2 A14B): transformer_2 below ratio * 1000

    # Absent in Wan 2.1 / TI2V-5B (transformer_2) and in Wan 2.2 I2V (no CLIP).
    optional_components: ClassVar[tuple[str, ...]] = ("transformer_2", "image_encoder", "image_processor")
    denoiser_components: ClassVar[tuple[str, ...]] = ("transformer", "transformer_2")  # two experts (A14B)

    # -- checkpoint switches ---------------------------------------------------------------------
    def configure_from_index(self, model_index) -> None:
        super().configure_from_index(model_index)
        if "boundary_ratio" in model_index.extra:  # the file's value, null included, wins (as in diffusers)
            value = model_index.extra["boundary_ratio"]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{model_index.folder / 'model_index.json'}: boundary_ratio must be a number "
                                  f"in (0, 1) or null, got {value!r}")
            self.boundary_ratio = None if value is None else float(value)
        if "expand_timesteps" in model_index.extra:
            self.expand_timesteps = bool(model_index.extra["expand_timesteps"])
        if self.expand_timesteps:  # TI2V weights served by WanImageToVideoPipeline: first-frame conditioning
            self.concat_condition = False

    def configure_from_components(self, components: dict) -> None:
        super().configure_from_components(components)
        model = components.get("transformer") or components.get("transformer_2")
        if model is not None:
            self.spatial_patch = int(model.config.get("patch_size", (1, 2, 2))[1])
        scheduler = components.get("scheduler")
        key = scheduler.flow_shift_key() if hasattr(scheduler, "flow_shift_key") else None
        saved = scheduler.config.get(key) if key else None
        if self.recommended_flow_shift is not None and saved is not None and saved != self.recommended_flow_shift:
            log.info("the checkpoint's scheduler_config.json sets %s=%s (used); the official recipe for this model "
                     "uses %s: pass generate(flow_shift=%s) to follow it", key, saved, self.recommended_flow_shift,
                     self.recommended_flow_shift)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.spatial_patch

    def default_size(self, components: dict) -> tuple[int, int]:
        return self.default_height, self.default_width

    def resolve_size(self, req, components) -> None:
        """Height/width (multiples of VAE scale x patch) and num_frames, which must be 4k+1 (the VAE's causal
        4x time compression): both rounded down with a warning like diffusers, or refused (size_policy)."""
        self.resolve_height_width(req, components)
        p, k = req.params, self.vae_temporal_factor
        n = p.num_frames or 81
        if k > 1 and n % k != 1:
            rounded = max(n // k * k + 1, 1)
            if self.size_policy == "error":
                raise SamplingParamError("num_frames", f"num_frames={n}: Wan needs {k}k+1 frames; use e.g. {rounded}")
            notice(log, "num_frames=%d is not %dk+1; using %d (as diffusers does)", n, k, rounded)
            n = rounded
        req.num_frames = n
        if p.guidance_scale_2 is not None and self.boundary_ratio is None:  # diffusers refuses it too
            raise SamplingParamError("guidance_scale_2", "only two-expert models (Wan 2.2 A14B) take a second guidance scale")

    def resolve_height_width(self, req, components) -> None:
        super().resolve_size(req, components)

    # -- text ------------------------------------------------------------------------------------
    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        """UMT5 last hidden states; positions past each prompt's true length are zeroed (diffusers trims
        and zero-pads back to ``max_sequence_length``)."""
        import torch

        tok, encoder = components["tokenizer"], components["text_encoder"]
        n = req.params.max_sequence_length
        inputs = tok([prompt_clean(p) for p in prompts], padding="max_length", max_length=n, truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = inputs.attention_mask
        with torch.inference_mode():
            embeds = encoder(inputs.input_ids.to(encoder.device), mask.to(encoder.device)).last_hidden_state
        keep = torch.arange(n)[None, :] < mask.gt(0).sum(dim=1)[:, None]
        embeds = torch.where(keep[..., None].to(embeds.device), embeds, torch.zeros((), dtype=embeds.dtype,
                                                                                     device=embeds.device))
        return PromptEmbeds(embeds=embeds.to(encoder.dtype).to(req.device), mask=mask.to(req.device))

    # -- latents ---------------------------------------------------------------------------------
    def latent_frames(self, req) -> int:
        return (req.num_frames - 1) // self.vae_temporal_factor + 1

    def latent_channels(self, components) -> int:
        model = components.get("transformer") or components["transformer_2"]
        return model.config["in_channels"]

    def latent_shape(self, req, components) -> tuple[int, ...]:
        s = self.vae_scale_factor
        return (req.batch_size, self.latent_channels(components), self.latent_frames(req), req.height // s,
                req.width // s)

    def latent_dtype(self, components):
        import torch

        return torch.float32  # diffusers draws and steps Wan latents in float32

    # -- image conditioning ----------------------------------------------------------------------
    def encode_condition_images(self, components, req):
        """VAE latents of the condition image, normalised. concat_condition: a 4-channel first-frame mask
        + latents of [image, black x (F-1)]; expand_timesteps: latents of the image alone (1 frame)."""
        import torch

        from diffcore.image_processing import resize, to_tensor
        from diffcore.models.latent_norm import normalize

        vae = components["vae"]
        image = to_tensor([resize(req.images[0], req.height, req.width)]).unsqueeze(2)  # (1, 3, 1, H, W)
        if self.concat_condition:
            image = torch.cat([image, image.new_zeros(1, 3, req.num_frames - 1, req.height, req.width)], dim=2)
        z = vae.encode(image.to(req.device, vae.dtype)).mode().float()
        z = normalize(z, vae).repeat(req.batch_size, 1, 1, 1, 1)
        if not self.concat_condition:
            return z
        mask = torch.zeros(req.batch_size, self.vae_temporal_factor, *z.shape[2:], device=z.device)
        mask[:, :, 0] = 1.0
        return torch.cat([mask, z], dim=1)

    def encode_image(self, components, req):
        """CLIP vision penultimate hidden states of the (unresized) condition image (Wan 2.1 I2V)."""
        import torch

        processor, encoder = components["image_processor"], components["image_encoder"]
        pixels = processor(images=req.images[0], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = encoder(pixel_values=pixels.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2].repeat(req.batch_size, 1, 1).to(req.device)

    def first_frame(self, req) -> bool:
        return self.expand_timesteps and req.image_latents is not None

    # -- denoising -------------------------------------------------------------------------------
    def prepare_condition(self, components, req) -> dict:
        """Per-branch transformer kwargs, plus what ``model_input`` / ``model_timestep`` read each step:
        ``dtype`` (the model's), ``condition_latents`` (I2V, cast once) and ``token_timestep_mask`` (TI2V)."""
        import torch

        from .transformer import ContextCache

        model = components.get("transformer") or components["transformer_2"]
        dtype = model.dtype
        f, h, w = req.latents.shape[2:]
        rope = model.rope(f, h, w, device=req.device)
        image = req.image_embeds.to(dtype) if req.image_embeds is not None else None

        def kwargs(p):  # a ContextCache per branch: the context's K/V are projected on the first step only
            return dict(encoder_hidden_states=p.embeds.to(dtype), encoder_hidden_states_image=image, rotary_emb=rope,
                        context_cache=ContextCache())

        neg = req.negative_prompt_embeds
        condition = {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(neg) if neg is not None else None,
                     "dtype": dtype}
        if self.concat_condition:  # cast once, not per step
            condition["condition_latents"] = req.image_latents.to(dtype)
        if self.first_frame(req):  # tokens of the clean first frame get timestep 0
            pt, ph, pw = model.patch_size
            per_frame = (h // ph) * (w // pw)
            token_t = torch.ones(f // pt * per_frame, device=req.device)
            token_t[:per_frame] = 0
            condition["token_timestep_mask"] = token_t
        return condition

    def hook_inputs(self) -> dict:
        """TI2V's ``model_input`` replaces the first latent frame with ``image_latents`` (when an image is given)."""
        from diffcore.stages import DenoisingLoopStage, In

        return {DenoisingLoopStage: (In("image_latents", required=False),)}

    def select_denoiser(self, t, req, num_denoisers: int) -> int:
        """Two experts: ``transformer`` for high noise, ``transformer_2`` below the boundary timestep."""
        if self.boundary_ratio is None or num_denoisers < 2:
            return 0
        scheduler_config = getattr(req.scheduler, "config", None) or {}  # few-step stages run without one
        boundary = self.boundary_ratio * scheduler_config.get("num_train_timesteps", 1000)
        return 0 if t >= boundary else 1

    def guidance_scale_at(self, t, req, expert: int):
        """``guidance_scale``; the low-noise expert takes ``guidance_scale_2`` where a row sets it."""
        scales = req.per_row("guidance_scale")
        if expert == 1:
            scales = [s if s2 is None else s2 for s, s2 in zip(scales, req.per_row("guidance_scale_2"))]
        return row_scale(scales)

    def model_input(self, latents, req):
        import torch

        dtype = req.condition["dtype"]
        if self.concat_condition:
            return torch.cat([latents.to(dtype), req.condition["condition_latents"]], dim=1)
        if self.first_frame(req):
            latents = self.apply_first_frame(latents, req)
        return latents.to(dtype)

    def apply_first_frame(self, latents, req):
        import torch

        return torch.cat([req.image_latents.to(latents.dtype), latents[:, :, 1:]], dim=2)

    def model_timestep(self, t, latents, req):
        """Wan takes t itself (not t/1000); per token (B, S) when the first frame is a clean image."""
        mask = req.condition.get("token_timestep_mask") if self.first_frame(req) else None
        if mask is not None:  # t: a scalar, or one per row (rows at different steps: diffcore.engine.stepping)
            return (mask.unsqueeze(0) * t.reshape(-1, 1)).expand(latents.shape[0], -1)
        return t.expand(latents.shape[0])


@attrs.define(kw_only=True)
class Wan21T2V14BConfig(WanConfig):
    """Wan 2.1 T2V-14B: official default 1280x720 with flow shift 5.0."""

    default_height: int = 720
    default_width: int = 1280
    recommended_flow_shift: Optional[float] = 5.0


@attrs.define(kw_only=True)
class Wan22T2VA14BConfig(WanConfig):
    """Wan 2.2 T2V-A14B: two experts switching at t = 875, flow shift 12.0."""

    default_height: int = 720
    default_width: int = 1280
    recommended_flow_shift: Optional[float] = 12.0
    boundary_ratio: Optional[float] = 0.875


@attrs.define(kw_only=True)
class Wan22TI2V5BConfig(WanConfig):
    """Wan 2.2 TI2V-5B: 48-channel VAE (x16), per-token timesteps, optional first-frame image, 24 fps."""

    default_height: int = 704
    default_width: int = 1280
    default_fps: Optional[int] = 24
    recommended_flow_shift: Optional[float] = 5.0
    expand_timesteps: bool = True


@attrs.define(kw_only=True)
class WanI2VConfig(WanConfig):
    """Wan 2.1 I2V-14B-480P: CLIP image tokens + mask/first-frame latents concatenated (36 channels)."""

    default_negative_prompt: Optional[str] = I2V_NEGATIVE_PROMPT
    concat_condition: bool = True

    def latent_channels(self, components) -> int:
        return components["vae"].config["z_dim"]  # the transformer's in_channels include the condition

    def resolve_height_width(self, req, components) -> None:
        """Without an explicit size, keep the image's aspect ratio at the default area (diffusers' example)."""
        p = req.params
        if (p.height is None or p.width is None) and req.images:
            w0, h0 = req.images[0].size
            area, m = self.default_height * self.default_width, self.size_multiple
            h = max(round((area * h0 / w0) ** 0.5) // m * m, m)
            w = max(round((area * w0 / h0) ** 0.5) // m * m, m)
            req.height = self.round_size("height", p.height or h)
            req.width = self.round_size("width", p.width or w)
        else:
            super().resolve_height_width(req, components)


@attrs.define(kw_only=True)
class WanI2V720PConfig(WanI2VConfig):
    default_height: int = 720
    default_width: int = 1280
    recommended_flow_shift: Optional[float] = 5.0


@attrs.define(kw_only=True)
class Wan22I2VA14BConfig(WanI2VConfig):
    """Wan 2.2 I2V-A14B: two experts switching at t = 900, no CLIP image encoder, flow shift 5.0."""

    default_negative_prompt: Optional[str] = DEFAULT_NEGATIVE_PROMPT
    default_height: int = 720
    default_width: int = 1280
    recommended_flow_shift: Optional[float] = 5.0
    boundary_ratio: Optional[float] = 0.9


# ---- sampling defaults ------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class WanSamplingParams(SamplingParams):
    """Wan 2.1 T2V: 81 frames, 50 steps, guidance 5.0 (height/width come from the config's default)."""

    num_frames: int = 81
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    # The low-noise expert's scale (two-expert models only; resolve_size refuses it elsewhere).
    guidance_scale_2: Optional[float] = attrs.field(default=None, validator=guidance)
    max_sequence_length: int = 512
    max_sequence_length_limit: ClassVar[int] = 512


class _TwoExpertParams:
    @classmethod
    def from_user(cls, **kwargs):
        """As in diffusers, a guidance_scale given without guidance_scale_2 serves both experts."""
        if kwargs.get("guidance_scale") is not None and kwargs.get("guidance_scale_2") is None:
            kwargs["guidance_scale_2"] = kwargs["guidance_scale"]
        return super().from_user(**kwargs)


@attrs.define(kw_only=True)
class Wan22T2VA14BSamplingParams(_TwoExpertParams, WanSamplingParams):
    """Official Wan 2.2 A14B T2V: 40 steps, guidance 4.0 (high noise) / 3.0 (low noise)."""

    num_inference_steps: int = 40
    guidance_scale: float = 4.0
    guidance_scale_2: Optional[float] = 3.0


@attrs.define(kw_only=True)
class Wan22TI2V5BSamplingParams(WanSamplingParams):
    """Official TI2V-5B: 121 frames at 24 fps; an optional first-frame image."""

    num_frames: int = 121
    max_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class WanI2VSamplingParams(WanSamplingParams):
    """Official Wan 2.1 I2V: 40 steps, guidance 5.0; one input image is required."""

    num_inference_steps: int = 40
    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class Wan22I2VA14BSamplingParams(_TwoExpertParams, WanI2VSamplingParams):
    """Official Wan 2.2 A14B I2V: 40 steps, guidance 3.5 for both experts."""

    guidance_scale: float = 3.5
    guidance_scale_2: Optional[float] = 3.5
