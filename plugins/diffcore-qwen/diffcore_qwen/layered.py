"""Qwen-Image-Layered: decompose a picture into ``layers`` RGBA layers (``QwenImageLayeredPipeline``).

Numerics follow diffusers' ``pipeline_qwenimage_layered.py``: the RGBA input is resized to ~``resolution``^2
pixels at its aspect (multiples of 32), VAE-encoded (posterior mode) as one condition frame; the noise has
``layers + 1`` frames (frame 0: the composite, then the layers), packed frame by frame; the transformer reads
``[frames, condition]`` with the layer-3D RoPE (condition at frame -1) and the additional timestep
condition (0); ``mu = sqrt(condition tokens / 256)``; true CFG (with a negative prompt), optionally
renormalised (``cfg_normalize``); the composite frame is dropped and each layer decoded as RGBA.

One request's ``output`` holds ``layers`` RGBA pictures per prompt: ``(prompts * layers, H, W, 4)``
(``GenerationResult.layers`` says how many per prompt; while it runs, ``(prompts, layers, H, W, 4)``). An
empty prompt (``""`` or ``" "``) is replaced by the picture's caption, written by the text encoder, as diffusers
does (``diffcore_qwen.captioning``).
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import attrs

from diffcore.configs import PipelineConfig
from diffcore.errors import SamplingParamError
from diffcore.stages import DecodingStage, InputValidationStage

from .captioning import EMPTY
from .configs import QwenImageConfig, QwenImageEditConfig, QwenImageSamplingParams, calculate_dimensions

RESOLUTIONS = (640, 1024)


def _resolution(inst, attribute, value):
    if value not in RESOLUTIONS:
        raise SamplingParamError("resolution", f"Qwen-Image-Layered works at resolution 640 or 1024 (the picture's "
                                               f"area, resolution^2 pixels), got {value!r}")


def _layers(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        raise SamplingParamError("layers", f"layers must be an integer from 1 to 16, got {value!r}")


def _flag(inst, attribute, value):
    if not isinstance(value, bool):
        raise SamplingParamError(attribute.name, f"expected true or false, got {value!r}")


@attrs.define(kw_only=True)
class QwenImageLayeredSamplingParams(QwenImageSamplingParams):
    """diffusers' defaults and names: ``layers`` 4, ``resolution`` 640, ``cfg_normalize`` False, true CFG 4.0
    (on only with a ``negative_prompt``; the model card uses ``" "``). One input image (RGBA; RGB is taken as
    opaque). The size comes from the picture and ``resolution``: ``height`` / ``width`` are not taken."""

    layers: int = attrs.field(default=4, validator=_layers)
    resolution: int = attrs.field(default=640, validator=_resolution)
    cfg_normalize: bool = attrs.field(default=False, validator=_flag)
    use_en_prompt: bool = attrs.field(default=False, validator=_flag)  # the captioning instruction's language
    min_images: ClassVar[int] = 1
    max_images: ClassVar[int] = 1
    captions_empty_prompt: ClassVar[bool] = True  # "" is captioned (diffcore_qwen.captioning); the server lets it in

    def check_limits(self) -> None:
        super().check_limits()
        if self.prompt not in EMPTY and any(not p.strip() for p in self.prompts):
            raise SamplingParamError("prompt", "a blank prompt: pass a description of the picture, or exactly \"\" "
                                               "(one prompt) to have the text encoder caption the picture, as diffusers "
                                               "does")
        if self.num_inference_steps < 2:
            raise SamplingParamError("num_inference_steps", "Qwen-Image-Layered needs at least 2 steps (1 step gives "
                                                            "NaN in the reference implementation)")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                raise SamplingParamError(name, "Qwen-Image-Layered takes its size from the picture and `resolution` "
                                               "(640 or 1024); leave height and width out")


@attrs.define(kw_only=True)
class QwenImageLayeredConfig(QwenImageConfig):
    optional_components: ClassVar[tuple[str, ...]] = ("processor",)  # only the empty-prompt captioning uses it
    custom_loaders = QwenImageEditConfig.custom_loaders  # the VL processor without transformers' video processor
    has_alpha: ClassVar[bool] = True  # RGBA layers (the server keeps them for background="transparent")
    previews: ClassVar[bool] = False  # decode makes several layers per prompt, not one picture (diffcore.previews)
    default_negative_prompt: Optional[str] = None  # diffusers: no CFG without a negative prompt
    cfg_norm_rescale: bool = False  # per request: cfg_normalize

    def condition_size(self, image, resolution: int) -> tuple[int, int]:
        """(height, width) of the picture as the VAE encodes it: ~resolution^2 pixels, multiples of 32."""
        w, h = calculate_dimensions(resolution * resolution, image.size[0] / image.size[1])
        return h, w

    def resolve_size(self, req, components) -> None:
        h, w = self.condition_size(req.images[0], req.params.resolution)  # decoded by the validation stage
        m = self.size_multiple
        req.height, req.width = h // m * m, w // m * m

    def latent_shape(self, req, components) -> tuple[int, ...]:
        """(B, layers + 1, C, h, w): frame 0 is the composite, then the layers."""
        c = components["transformer"].config["in_channels"] // 4
        f = self.vae_scale_factor
        return req.batch_size, req.params.layers + 1, c, req.height // f, req.width // f

    def pack_latents(self, latents, req):
        """(B, F, C, h, w) -> (B, F * h/2 * w/2, C * 4), frame by frame."""
        b, n, c, h, w = latents.shape
        latents = latents.view(b, n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return latents.reshape(b, n * (h // 2) * (w // 2), c * 4)

    def unpack_latents(self, latents, req):
        """(B, tokens, C * 4) -> (B, C, F, h, w), the VAE's layout."""
        b, _, d = latents.shape
        f = self.vae_scale_factor
        h, w = req.height // f, req.width // f
        latents = latents.view(b, req.params.layers + 1, h // 2, w // 2, d // 4, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
        return latents.reshape(b, req.params.layers + 1, d // 4, h, w).permute(0, 2, 1, 3, 4)

    def schedule_mu(self, scheduler, req) -> float:
        """diffusers: ``mu = sqrt(condition tokens / 256)``."""
        h, w = self.condition_size(req.images[0], req.params.resolution)
        m = self.size_multiple
        return math.sqrt((h // m) * (w // m) / 256)

    def hook_inputs(self) -> dict:
        import torch

        from diffcore.stages import ConditioningStage, DenoisingLoopStage, In

        return {ConditioningStage: (In("images", list),), DenoisingLoopStage: (In("image_latents", torch.Tensor),)}

    def batch_key(self, req) -> tuple:
        p = req.params
        return (p.layers, p.resolution, p.cfg_normalize, self.condition_size(req.images[0], p.resolution))

    def encode_condition_images(self, components, req):
        """The RGBA picture at its condition size, posterior mode, normalised, packed as one frame."""
        import torch

        from diffcore.image_processing import resize, to_tensor
        from diffcore.models.latent_norm import normalize

        vae, dtype = components["vae"], components["transformer"].dtype
        h, w = self.condition_size(req.images[0], req.params.resolution)
        with torch.inference_mode():
            pixels = to_tensor([resize(req.images[0], h, w)]).unsqueeze(2).to(req.device, vae.dtype)
            z = normalize(vae.encode(pixels).mode(), vae).to(dtype)  # (1, C, 1, h, w)
            return self.pack_latents(z.permute(0, 2, 1, 3, 4), req).expand(req.batch_size, -1, -1)

    def img_shapes(self, req) -> list[tuple[int, int, int]]:
        m = self.size_multiple
        h, w = self.condition_size(req.images[0], req.params.resolution)
        return [(1, req.height // m, req.width // m)] * (req.params.layers + 1) + [(1, h // m, w // m)]

    def prepare_condition(self, components, req) -> dict:
        import torch

        cond = super().prepare_condition(components, req)
        is_rgb = torch.zeros(req.batch_size, dtype=torch.long, device=req.device)  # diffusers always passes 0
        for kw in (cond["cond"], cond["uncond"]):
            if kw is not None:
                kw["additional_t_cond"] = is_rgb
        return cond

    # the condition tokens follow the generated ones, and their prediction is dropped (as for Edit)
    model_input = QwenImageEditConfig.model_input
    model_output = QwenImageEditConfig.model_output

    def combine_guidance(self, cond, uncond, scale, req):
        out = PipelineConfig.combine_guidance(self, cond, uncond, scale, req)  # plain true CFG, then per request:
        if req.params.cfg_normalize:
            import torch

            out = out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))
        return out

    def decode(self, components, latents, req):
        """Drop the composite frame, decode every layer as a one-frame RGBA video: (B, layers, H, W, 4), one row per
        prompt (so a batch splits back into its requests by rows; the result lists them prompt by prompt)."""
        from diffcore.models.latent_norm import denormalize

        vae = components["vae"]
        z = denormalize(self.unpack_latents(latents, req), vae)[:, :, 1:]
        b, c, n, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(b * n, c, 1, h, w)
        pixels = self.to_pixels(vae.decode(z.to(vae.dtype)))
        return pixels.reshape(b, n, *pixels.shape[1:])


class LayeredInputValidationStage(InputValidationStage):
    """The input picture keeps its alpha channel (the Layered VAE encodes RGBA; an RGB picture is taken as opaque)."""

    def forward(self, req):
        from pathlib import Path

        from PIL import Image

        req = super().forward(req)  # validated (a readable file, a supported mode) and loaded as RGB
        item = req.params.images[0]
        if isinstance(item, (str, Path)):
            with Image.open(item) as img:
                source = img.convert("RGBA")
        else:
            source = item if hasattr(item, "convert") else req.images[0]
        req.images = [source.convert("RGBA") if source.mode != "RGBA" else source]
        return req


class LayeredDecodingStage(DecodingStage):
    """Decoding to ``layers`` pictures per prompt, kept as one row per prompt, ``(B, layers, H, W, 4)``: Layered
    requests with the same layer count, resolution, condition size and ``cfg_normalize`` share a batch (the
    config's ``batch_key``), and split back into their requests by rows."""
