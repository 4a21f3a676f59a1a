"""Qwen-Image configs: Qwen2.5-VL prompt encoding, the (B, 1, C, H, W) latent layout, RoPE shapes, defaults.

Numerics follow diffusers' ``pipeline_qwenimage.py``, ``pipeline_qwenimage_edit.py`` and
``pipeline_qwenimage_edit_plus.py``: the prompt is wrapped in a chat template, the VL model's last
hidden states are taken, the template's system prefix (34 / 64 tokens) is dropped per prompt, and
the batch is right-padded to its longest prompt with a mask. Edit models append the VAE latents of
the input image(s) (at ~1 MP) to the image tokens and drop the prediction for them.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import attrs

from diffcore.configs import PipelineConfig, SamplingParams
from diffcore.request import PromptEmbeds

_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``target_area`` pixels at aspect ``ratio`` (w/h), multiples of 32 (as diffusers)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def _transformer_config(folder) -> dict:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(folder) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def is_zero_cond_t(model_index, folder) -> bool:
    """Qwen-Image-Edit-2511 (same pipeline class as 2509): its transformer has ``zero_cond_t``."""
    return bool(_transformer_config(folder).get("zero_cond_t"))


def _masked_rows(hidden, mask, drop: int):
    """Per prompt: its real (mask=1) hidden states minus the first ``drop`` (the system prefix); then
    right-pad to the longest with zeros and return ``(embeds, mask)`` as diffusers does."""
    import torch

    rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask)]
    n = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
    new_mask = torch.stack([(torch.arange(n, device=hidden.device) < r.shape[0]).long() for r in rows])
    return embeds, new_mask


def last_hidden_state(encoder, inputs: dict):
    """``hidden_states[-1]`` of Qwen2_5_VLForConditionalGeneration, what diffusers takes. The inner model's
    ``last_hidden_state`` is the same tensor, without the LM head's logits (~150k per token), the other
    layers' states or a KV cache."""
    inner = getattr(encoder, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner(**inputs, use_cache=False).last_hidden_state
    return encoder(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]


@attrs.define(kw_only=True)
class QwenImageConfig(PipelineConfig):
    """Qwen-Image text-to-image: true CFG with norm rescale, negative prompt " " by default."""
    sequence_parallel: ClassVar[bool] = True  # the transformer shards its tokens (Ulysses)

    default_dtype: str = "bfloat16"
    cfg: str = "true_cfg"
    cfg_norm_rescale: bool = True
    default_negative_prompt: Optional[str] = " "
    prompt_template: str = T2I_TEMPLATE
    drop_tokens: int = 34
    tokenizer_max_length: int = 1024
    truncate_embeds: bool = True  # Qwen-Image cuts embeds to max_sequence_length; the Edit pipelines do not

    def default_size(self, components) -> tuple[int, int]:
        return 128 * self.vae_scale_factor, 128 * self.vae_scale_factor  # diffusers' default_sample_size

    def combine_guidance(self, cond, uncond, scale, req):
        """True CFG, then (``cfg_norm_rescale``) rescaled to keep the norm of ``cond`` along the channel axis."""
        out = super().combine_guidance(cond, uncond, scale, req)
        if self.cfg_norm_rescale:
            import torch

            out = out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))
        return out

    # ---- text ------------------------------------------------------------------------------
    def text_inputs(self, components, prompts: list[str], req) -> dict:
        texts = [self.prompt_template.format(p) for p in prompts]
        return dict(components["tokenizer"](texts, max_length=self.tokenizer_max_length + self.drop_tokens,
                                            padding=True, truncation=True, return_tensors="pt"))

    def encode_prompts(self, components, prompts, req) -> PromptEmbeds:
        import torch

        encoder = components["text_encoder"]
        with torch.inference_mode():
            inputs = {k: v.to(encoder.device) for k, v in self.text_inputs(components, prompts, req).items()}
            hidden = last_hidden_state(encoder, inputs)
            embeds, mask = _masked_rows(hidden, inputs["attention_mask"], self.drop_tokens)
            del hidden
        if self.truncate_embeds:
            n = req.params.max_sequence_length
            embeds, mask = embeds[:, :n], mask[:, :n]
        return PromptEmbeds(embeds=embeds.to(req.device, encoder.dtype), mask=mask.to(req.device))

    # ---- latents: diffusers draws (B, 1, C, H, W) noise; VAE latents are (B, C, 1, H, W) -------
    def latent_shape(self, req, components) -> tuple[int, ...]:
        c = components["transformer"].config["in_channels"] // (self.latent_patch**2)
        m = self.size_multiple
        return req.batch_size, 1, c, req.height // m * self.latent_patch, req.width // m * self.latent_patch

    def pack_latents(self, latents, req):
        """(B, 1, C, H, W) or (B, C, 1, H, W) -> 2x2 patch tokens; with one frame both have (B, C, H, W)'s memory order."""
        b, h, w = latents.shape[0], latents.shape[-2], latents.shape[-1]
        return super().pack_latents(latents.reshape(b, -1, h, w), req)

    def unpack_latents(self, latents, req):
        return super().unpack_latents(latents, req).unsqueeze(2)  # (B, C, 1, H, W) for the 3D VAE

    def image_seq_len(self, req) -> int:
        return (req.height // self.size_multiple) * (req.width // self.size_multiple)

    # ---- denoising -------------------------------------------------------------------------
    def img_shapes(self, req) -> list[tuple[int, int, int]]:
        """(frames, h, w) token grid of every image in a sample: the generated one first."""
        m = self.size_multiple
        return [(1, req.height // m, req.width // m)]

    def prepare_condition(self, components, req) -> dict:
        model = components["transformer"]
        shapes = [self.img_shapes(req)] * req.batch_size

        def kwargs(p: PromptEmbeds):
            mask = None if p.mask is None or bool(p.mask.all()) else p.mask  # diffusers passes None when unpadded
            return dict(encoder_hidden_states=p.embeds.to(model.dtype), encoder_hidden_states_mask=mask,
                        img_shapes=shapes, rotary_emb=model.rope(shapes, p.embeds.shape[1], device=req.device))

        neg = req.negative_prompt_embeds
        return {"cond": kwargs(req.prompt_embeds), "uncond": kwargs(neg) if neg is not None else None}


@attrs.define(kw_only=True)
class QwenImageEditConfig(QwenImageConfig):
    """Qwen-Image-Edit: one input image, seen by the VL encoder and (at ~1 MP) by the VAE."""

    prompt_template: str = EDIT_TEMPLATE
    drop_tokens: int = 64
    truncate_embeds: bool = False
    vae_area: int = 1024 * 1024
    vl_area: Optional[int] = None  # None: the VL encoder sees the image at the VAE's size (~1 MP)
    size_reference: int = 0  # which input image sets the default output aspect (diffusers: first; Plus: last)

    def custom_loaders(self) -> dict:
        """transformers' Qwen2VLProcessor needs torchvision (via its video processor): load its parts instead."""
        from .processor import load_processor

        return {"processor": load_processor, "Qwen2VLProcessor": load_processor}

    def vae_size(self, image) -> tuple[int, int]:
        """(height, width) the VAE encodes ``image`` at: ~vae_area pixels, its aspect, multiples of 32."""
        w, h = calculate_dimensions(self.vae_area, image.size[0] / image.size[1])
        return h, w

    def _inputs(self, req) -> list:
        return req.images[:1]

    def hook_inputs(self) -> dict:
        """``prepare_condition`` sizes the input-image tokens from ``images``; ``model_input`` appends ``image_latents``."""
        import torch

        from diffcore.stages import ConditioningStage, DenoisingLoopStage, In

        return {ConditioningStage: (In("images", list),), DenoisingLoopStage: (In("image_latents", torch.Tensor),)}

    def batch_key(self, req) -> tuple:
        """Rows share transformer calls only with the same input-image token grids (``img_shapes``)."""
        return tuple(self.vae_size(im) for im in self._inputs(req))

    def resolve_size(self, req, components) -> None:
        """Without an explicit size: the reference input's aspect at ~1 MP (its VAE size), floored to the model's multiple."""
        p = req.params
        height, width = p.height, p.width
        if (height is None or width is None) and req.images:
            h, w = self.vae_size(req.images[self.size_reference % len(req.images)])
            height, width = height or h, width or w
        req.height = self.round_size("height", height or self.default_size(components)[0])
        req.width = self.round_size("width", width or self.default_size(components)[1])

    # ---- text + vision ---------------------------------------------------------------------
    def vl_images(self, req) -> list:
        """The input image(s) as the VL encoder sees them, computed once per request."""
        from diffcore.image_processing import resize

        if "qwen_vl_images" not in req.extra:
            sizes = [self.vae_size(im) if self.vl_area is None else
                     calculate_dimensions(self.vl_area, im.size[0] / im.size[1])[::-1] for im in self._inputs(req)]
            req.extra["qwen_vl_images"] = [resize(im, h, w) for im, (h, w) in zip(self._inputs(req), sizes)]
        return req.extra["qwen_vl_images"]

    def image_prompt(self, n_images: int) -> str:
        return ""

    def text_inputs(self, components, prompts, req) -> dict:
        images = self.vl_images(req)
        texts = [self.prompt_template.format(self.image_prompt(len(images)) + p) for p in prompts]
        return components["processor"](text=texts, images=images * len(prompts), padding=True, return_tensors="pt")

    # ---- condition latents -----------------------------------------------------------------
    def encode_condition_images(self, components, req):
        """VAE-encode each input at its ~1 MP size; under inference_mode so no activation outlives the encode."""
        import torch

        from diffcore.image_processing import resize, to_tensor
        from diffcore.models.latent_norm import normalize

        vae, dtype = components["vae"], components["transformer"].dtype
        tokens = []
        with torch.inference_mode():
            for im in self._inputs(req):
                pixels = to_tensor([resize(im, *self.vae_size(im))]).unsqueeze(2).to(req.device, vae.dtype)
                z = normalize(vae.encode(pixels).mode(), vae).to(dtype)
                del pixels
                tokens.append(self.pack_latents(z, req).expand(req.batch_size, -1, -1))
            return torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]

    def img_shapes(self, req) -> list[tuple[int, int, int]]:
        m = self.size_multiple
        return super().img_shapes(req) + [(1, h // m, w // m) for h, w in map(self.vae_size, self._inputs(req))]

    def model_input(self, latents, req):
        import torch

        return torch.cat([latents, req.image_latents], dim=1)

    def model_output(self, noise_pred, req):
        return noise_pred[:, : req.latents.shape[1]]


@attrs.define(kw_only=True)
class QwenImageEditPlusConfig(QwenImageEditConfig):
    """Qwen-Image-Edit-2509 (and 2511): 1-3 input images, "Picture N:" prompts, VL encoder at ~384x384."""

    prompt_template: str = EDIT_PLUS_TEMPLATE
    vl_area: Optional[int] = 384 * 384
    size_reference: int = -1

    def _inputs(self, req) -> list:
        return req.images

    def image_prompt(self, n_images: int) -> str:
        return "".join(PICTURE_TEMPLATE.format(i + 1) for i in range(n_images))


@attrs.define(kw_only=True)
class QwenImageSamplingParams(SamplingParams):
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    max_sequence_length: int = 512
    max_sequence_length_limit: ClassVar[int] = 1024


@attrs.define(kw_only=True)
class QwenImageEditSamplingParams(QwenImageSamplingParams):
    min_images: ClassVar[int] = 1
    max_images: ClassVar[int] = 1


@attrs.define(kw_only=True)
class QwenImageEditPlusSamplingParams(QwenImageSamplingParams):
    num_inference_steps: int = 40
    min_images: ClassVar[int] = 1
    max_images: ClassVar[int] = 3
