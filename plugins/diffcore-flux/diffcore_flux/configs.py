"""FLUX.1 configs: text encoding (CLIP pooled + T5), packed 2x2 latents, position ids, defaults."""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.request import PromptEmbeds

# (width, height) pairs Kontext was trained on; an input image is resized to the closest aspect.
KONTEXT_RESOLUTIONS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672)]


def _guidance_embeds(folder: Path):
    try:
        return json.loads((Path(folder) / "transformer" / "config.json").read_text()).get("guidance_embeds")
    except (OSError, ValueError):
        return None


def is_flux_dev(model_index, folder) -> bool:
    return _guidance_embeds(folder) is True


def is_flux_schnell(model_index, folder) -> bool:
    return _guidance_embeds(folder) is False


def latent_ids(h: int, w: int, first: float = 0.0, device=None, dtype=None):
    """(h*w, 3) position ids (first, row, col) of a packed latent grid."""
    import torch

    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3).to(dtype or torch.float32)


@attrs.define(kw_only=True)
class FluxDevConfig(PipelineConfig):
    sequence_parallel: ClassVar[bool] = True  # the transformer shards its tokens (Ulysses)
    default_dtype: str = "bfloat16"
    cfg: str = "true_cfg"  # only when a negative prompt and true_cfg_scale > 1 are given, as diffusers does

    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        import torch

        clip, clip_tok = components["text_encoder"], components["tokenizer"]
        t5, t5_tok = components["text_encoder_2"], components["tokenizer_2"]
        clip_len = getattr(clip_tok, "model_max_length", 77) or 77
        clip_len = clip_len if clip_len < 10_000 else 77
        with torch.inference_mode():
            ids = clip_tok(prompts, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt").input_ids
            pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
            ids = t5_tok(prompts, padding="max_length", max_length=req.params.max_sequence_length, truncation=True,
                         return_tensors="pt").input_ids
            embeds = t5(ids.to(t5.device), output_hidden_states=False)[0].to(t5.dtype)
        return PromptEmbeds(embeds=embeds.to(req.device), pooled=pooled.to(req.device))

    def image_seq_len(self, req) -> int:
        return (req.height // self.size_multiple) * (req.width // self.size_multiple)

    def image_ids(self, req):
        m = self.size_multiple
        return latent_ids(req.height // m, req.width // m, device=req.device)

    def prepare_condition(self, components, req) -> dict:
        import torch

        model = components["transformer"]
        dtype = model.dtype
        img_ids = self.image_ids(req)
        cond, neg = req.prompt_embeds, req.negative_prompt_embeds
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=req.device)
        rope = model.rope(img_ids, txt_ids)
        guidance = None
        if model.config.get("guidance_embeds"):  # one embedded guidance value per row
            guidance = torch.tensor(req.per_row("guidance_scale"), dtype=torch.float32, device=req.device)

        def kwargs(p):
            return dict(encoder_hidden_states=p.embeds.to(dtype), pooled_projections=p.pooled.to(dtype),
                        guidance=guidance, rotary_emb=rope)

        return {"cond": kwargs(cond), "uncond": kwargs(neg) if neg is not None else None}


@attrs.define(kw_only=True)
class FluxSchnellConfig(FluxDevConfig):
    pass


@attrs.define(kw_only=True)
class FluxKontextConfig(FluxDevConfig):
    max_area: int = 1024**2
    auto_resize: bool = True

    def resolve_size(self, req, components) -> None:
        """Without an explicit size, keep the input image's aspect ratio at ~max_area pixels."""
        p = req.params
        if p.height is None or p.width is None:
            w0, h0 = req.images[0].size if req.images else (1024, 1024)
            aspect = w0 / h0
            width, height = round((self.max_area * aspect) ** 0.5), round((self.max_area / aspect) ** 0.5)
            req.height, req.width = p.height or height // 16 * 16, p.width or width // 16 * 16
        else:
            req.height, req.width = p.height, p.width
        req.height, req.width = self.round_size("height", req.height), self.round_size("width", req.width)

    def hook_inputs(self) -> dict:
        """``prepare_condition`` sizes the condition tokens from ``images``; ``model_input`` appends ``image_latents``."""
        import torch

        from diffcore.stages import ConditioningStage, DenoisingLoopStage, In

        return {ConditioningStage: (In("images", list),), DenoisingLoopStage: (In("image_latents", torch.Tensor),)}

    def batch_key(self, req) -> tuple:
        """Rows share transformer calls only with the same condition-image token grid (its RoPE ids)."""
        return (self.condition_size(req.images[0]),) if req.images else ()

    def condition_size(self, image) -> tuple[int, int]:
        """(height, width) the VAE sees the input at: the closest trained resolution, multiples of 16."""
        w, h = image.size
        if self.auto_resize:
            aspect = w / h
            _, w, h = min((abs(aspect - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
        m = self.size_multiple
        return h // m * m, w // m * m

    def encode_condition_images(self, components, req):
        from diffcore.image_processing import resize, to_tensor
        from diffcore.models.latent_norm import normalize

        vae = components["vae"]
        h, w = self.condition_size(req.images[0])
        pixels = to_tensor([resize(req.images[0], h, w)]).to(req.device, vae.dtype)
        z = normalize(vae.encode(pixels).mode(), vae)
        z = z.expand(req.batch_size, -1, -1, -1).to(components["transformer"].dtype)
        return self.pack_latents(z, req)

    def prepare_condition(self, components, req) -> dict:
        import torch

        h, w = self.condition_size(req.images[0])
        m = self.size_multiple
        img_ids = torch.cat([self.image_ids(req), latent_ids(h // m, w // m, first=1.0, device=req.device)])
        cond = super().prepare_condition(components, req)
        model = components["transformer"]
        txt_ids = torch.zeros(req.prompt_embeds.embeds.shape[1], 3, device=req.device)
        rope = model.rope(img_ids, txt_ids)
        for kw in (cond["cond"], cond["uncond"]):
            if kw is not None:
                kw["rotary_emb"] = rope
        return cond

    def model_input(self, latents, req):
        import torch

        return torch.cat([latents, req.image_latents], dim=1)

    def model_output(self, noise_pred, req):
        return noise_pred[:, : req.latents.shape[1]]


@attrs.define(kw_only=True)
class FluxDevSamplingParams(SamplingParams):
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    max_sequence_length_limit: ClassVar[int] = 512


@attrs.define(kw_only=True)
class FluxSchnellSamplingParams(FluxDevSamplingParams):
    num_inference_steps: int = 4
    guidance_scale: float = 0.0
    max_sequence_length: int = 256
    max_sequence_length_limit: ClassVar[int] = 256


@attrs.define(kw_only=True)
class FluxKontextSamplingParams(FluxDevSamplingParams):
    """Kontext-dev: 28 steps and guidance 2.5, the model card's recommendation (diffusers defaults to 3.5)."""

    height: int = None
    width: int = None
    guidance_scale: float = 2.5
    max_images: ClassVar[int] = 1
    min_images: ClassVar[int] = 1
