"""Encoding stages: prompts, images through an image/VL encoder, condition images through the VAE."""
from __future__ import annotations

import threading

from ..request import PromptEmbeds, Request
from .base import In, Out, PipelineStage


class TextEncodingStage(PipelineStage):
    """Encode prompts (and negatives when CFG runs) with the model's encoders via ``encode_prompts``.

    The hook may read ``req.images`` too: a vision-language encoder (Qwen-Image-Edit) sees the
    condition images together with the prompt.

    Concurrent requests encode one at a time: a fast tokenizer keeps its padding and truncation
    settings on the shared Rust object (set, then used, on every call), so two threads with
    different lengths would tokenize with each other's settings.
    """

    inputs = (In("prompts", list), In("do_cfg", bool), In("negative_prompts", list, required=False))
    outputs = (Out("prompt_embeds", PromptEmbeds), Out("negative_prompt_embeds", PromptEmbeds, required=False))

    def __init__(self, config, components: dict, needs_images: bool = False):
        super().__init__()
        self.config, self.components = config, components
        if needs_images:  # each request with its own images; else all rows in one encoder call
            self.inputs = self.inputs + (In("images", list),)
        self.batch = "each" if needs_images else "rows"
        self._lock = threading.Lock()

    def forward(self, req: Request) -> Request:
        with self._lock:
            req.prompt_embeds = self.config.encode_prompts(self.components, req.prompts, req)
            if req.do_cfg and req.negative_prompts is not None:
                req.negative_prompt_embeds = self.config.encode_prompts(self.components, req.negative_prompts, req)
        return req


class ImageEncodingStage(PipelineStage):
    """Encode condition images with an image encoder (e.g. CLIP vision for Wan 2.1 I2V)."""

    inputs = (In("images", list),)
    outputs = (Out("image_embeds"),)
    batch = "each"

    def __init__(self, config, components: dict):
        super().__init__()
        self.config, self.components = config, components

    def forward(self, req: Request) -> Request:
        req.image_embeds = self.config.encode_image(self.components, req)
        return req


class ImageVAEEncodingStage(PipelineStage):
    """VAE-encode condition images into latents in the model's layout (``encode_condition_images``)."""

    inputs = (In("images", list), In("height", int), In("width", int))
    outputs = (Out("image_latents"),)
    batch = "each"

    def __init__(self, config, components: dict, required: bool = True):
        super().__init__()
        self.config, self.components = config, components
        if not required:  # e.g. Wan TI2V: the image is optional
            self.inputs = (In("images", list, required=False), In("height", int), In("width", int))
            self.outputs = (Out("image_latents", required=False),)

    def forward(self, req: Request) -> Request:
        if req.images:
            req.image_latents = self.config.encode_condition_images(self.components, req)
        return req
