"""Z-Image configs: the hooks the core stages call, and the model cards' sampling defaults.

What differs from the other families (diffusers' ZImagePipeline / ZImageImg2ImgPipeline):
* the prompt goes through Qwen3's chat template; the text feature is ``hidden_states[-2]``, padding dropped per
  prompt (here: kept as a right-padded batch with a mask; the transformer re-pads each caption to a multiple
  of 32 with its learned pad token);
* latents stay (B, 16, H/8, W/8) in float32; the transformer patchifies them, sizes are multiples of 16;
* the model's time is ``1 - sigma`` and its output is negated before the Euler step;
* guidance is ``pos + g (pos - neg)`` with ``g > 0``, optionally stopped once ``1 - sigma > cfg_truncation``
  (the per-step guidance policy) and renormalised to at most ``cfg_normalization`` times ``||pos||`` per row.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar, Optional

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.configs.pipeline_config import broadcast_rows
from diffcore.errors import SamplingParamError
from diffcore.notices import notice
from diffcore.request import PromptEmbeds
from diffcore.tasks import IMG2IMG, strength_validator

log = logging.getLogger(__name__)


def is_zimage_turbo(model_index, folder) -> bool:
    """A local folder named like the Turbo checkpoint (``Z-Image-Turbo``); the Hub id and alias select it too."""
    return "turbo" in Path(folder).name.lower()


@attrs.define(kw_only=True)
class ZImageConfig(PipelineConfig):
    """Tongyi-MAI/Z-Image (base): CFG against an empty negative prompt, with truncation and renormalisation."""

    sequence_parallel: ClassVar[bool] = True  # the transformer shards its unified sequence (Ulysses)
    mixed_cfg_batches: ClassVar[bool] = True  # guidance_scale 0 and > 0 rows share a batch (wants_cfg per row)

    default_dtype: str = "bfloat16"
    latent_patch: int = 1  # latents stay (B, C, H, W); the transformer patchifies them
    patch_size: int = 2  # the transformer's 2x2 patches: sizes are multiples of vae_scale_factor * 2
    cfg: str = "cfg"
    default_negative_prompt: Optional[str] = ""

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def default_size(self, components) -> tuple[int, int]:
        return 1024, 1024

    # ---- text ---------------------------------------------------------------------------------
    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        """Chat template (one user turn, generation prompt, thinking enabled = no think block), Qwen3's
        penultimate hidden state; rows right-padded to the longest prompt with a mask."""
        import torch

        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]
        inputs = tokenizer(texts, padding="longest", max_length=req.params.max_sequence_length, truncation=True,
                           return_tensors="pt")
        mask = inputs.attention_mask.to(encoder.device).bool()
        with torch.inference_mode():
            hidden = encoder(input_ids=inputs.input_ids.to(encoder.device), attention_mask=mask,
                             output_hidden_states=True).hidden_states[-2]
        return PromptEmbeds(embeds=hidden.to(req.device), mask=mask.to(req.device))

    # ---- latents ------------------------------------------------------------------------------
    def latent_dtype(self, components):
        import torch

        return torch.float32  # diffusers keeps the latents in fp32 and casts per call

    def prepare_condition(self, components, req) -> dict:
        model = components["transformer"]
        grid = (req.height // self.size_multiple, req.width // self.size_multiple)

        def kwargs(p: Optional[PromptEmbeds]) -> Optional[dict]:
            if p is None:
                return None
            lens = [int(n) for n in p.mask.sum(1)] if p.mask is not None else [p.embeds.shape[1]] * p.embeds.shape[0]
            return {"encoder_hidden_states": p.embeds.to(model.dtype), "layout": model.layout(lens, grid, req.device)}

        return {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(req.negative_prompt_embeds)}

    def condition_rows(self, kwargs, rows, req) -> dict:
        """The unconditional call for the rows still under guidance only (a layout for their captions, kept in
        the batch layout's memo, so that the next steps reuse it and its caption stream)."""
        import torch

        memo, key = kwargs["layout"].memo, ("rows", tuple(rows))
        if key not in memo:
            layout = kwargs["layout"].rows(rows)
            embeds = kwargs["encoder_hidden_states"][torch.tensor(rows, device=kwargs["encoder_hidden_states"].device)]
            memo[key] = {"encoder_hidden_states": embeds[:, : max(layout.cap_lens)], "layout": layout}
        return memo[key]

    def model_input(self, latents, req):
        return latents

    def model_timestep(self, t, latents, req):
        """Z-Image's time runs 0 = noise -> 1 = clean: ``(1000 - t) / 1000``."""
        return (1000 - t.expand(latents.shape[0]).float()) / 1000

    def model_output(self, noise_pred, req):
        return -noise_pred.float()  # the flow velocity in the scheduler's direction

    # ---- guidance -----------------------------------------------------------------------------
    def wants_cfg(self, params) -> bool:
        return params.guidance_scale > 0  # diffusers' ZImagePipeline: any positive scale

    def guidance_active(self, params, step, t) -> bool:
        """``cfg_truncation``: no guidance once the model time ``1 - sigma`` exceeds it (1.0: never stops)."""
        t_norm = float((1000 - t.float()) / 1000)
        return params.guidance_scale > 0 and not t_norm > params.cfg_truncation

    def combine_guidance(self, cond, uncond, scale, req):
        """``pos + g (pos - neg)``, then per row (``cfg_normalization`` = c > 0) scaled down to ``c ||pos||``."""
        import torch

        pred = cond + broadcast_rows(scale, cond) * (cond - uncond)
        ratios = [float(c) for c in req.per_row("cfg_normalization")]
        if any(c > 0 for c in ratios):
            pred = pred.clone()
            for i, c in enumerate(ratios):
                if c > 0:
                    limit = torch.linalg.vector_norm(cond[i]) * c
                    norm = torch.linalg.vector_norm(pred[i])
                    if norm > limit:
                        pred[i] = pred[i] * (limit / norm)
        return pred

    # ---- img2img (the core's composition; diffusers encodes the input at its own size) ----------
    def resolve_size(self, req, components) -> None:
        """Without a size, img2img keeps the input image's (rounded to a multiple of 16)."""
        p = req.params
        if req.images and (p.height is None or p.width is None):
            w, h = req.images[0].size
            req.height = self.round_size("height", p.height or h)
            req.width = self.round_size("width", p.width or w)
            return
        super().resolve_size(req, components)


@attrs.define(kw_only=True)
class ZImageTurboConfig(ZImageConfig):
    """Tongyi-MAI/Z-Image-Turbo: distilled to 8 steps without CFG; a guidance scale is ignored with a warning."""

    cfg: str = "none"
    default_negative_prompt: Optional[str] = None

    def wants_cfg(self, params) -> bool:
        if params.guidance_scale > 0:
            notice(log, "guidance_scale=%s is ignored: Z-Image-Turbo is guidance-distilled (8 steps, no CFG)",
                   params.guidance_scale, ignored="guidance_scale")
        return False


def _truncation(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise SamplingParamError(attribute.name, f"must be a number in [0, 1] (the model time after which guidance "
                                                 f"stops; 1.0 = never), got {value!r}")


def _normalization(inst, attribute, value):
    if isinstance(value, bool):
        return  # diffusers types it bool: True = at most the conditional prediction's norm (ratio 1)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SamplingParamError(attribute.name, f"must be False/True or a ratio >= 0 (0 = off), got {value!r}")


@attrs.define(kw_only=True)
class ZImageSamplingParams(SamplingParams):
    """diffusers' defaults for Z-Image (base): 50 steps, guidance 5, 1024 x 1024."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    cfg_normalization: float | bool = attrs.field(default=False, validator=_normalization)
    cfg_truncation: float = attrs.field(default=1.0, validator=_truncation)
    max_sequence_length: int = 512
    max_sequence_length_limit: ClassVar[int] = 512


@attrs.define(kw_only=True)
class ZImageTurboSamplingParams(ZImageSamplingParams):
    """The model card's: 8 steps (8 transformer calls), no guidance."""

    num_inference_steps: int = 8
    guidance_scale: float = 0.0


@attrs.define(kw_only=True)
class ZImageImg2ImgSamplingParams(ZImageSamplingParams):
    strength: float = attrs.field(default=0.6, validator=strength_validator)
    task: ClassVar[str] = IMG2IMG  # the composition a ZImageImg2ImgPipeline folder serves
    min_images: ClassVar[int] = 1
    max_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class ZImageTurboImg2ImgSamplingParams(ZImageImg2ImgSamplingParams):
    num_inference_steps: int = 8
    guidance_scale: float = 0.0
