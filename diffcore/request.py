"""The state of one generation as it flows through the stages. Explicit fields only.

Everything that changes while a request runs lives here (or in objects it owns); stages, configs and
models only read their own construction, so concurrent requests on one pipeline never share state.
"""
from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from .configs.sampling_params import SamplingParams


@attrs.frozen
class PromptEmbeds:
    """What a text encoder produced for a batch of prompts."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


# Fields a freshly built Request already holds (the start of the dataflow proof).
REQUEST_INPUTS = ("params", "prompts", "batch_size", "device", "generator")


@attrs.define(kw_only=True)
class Request:
    params: SamplingParams
    prompts: list[str]
    batch_size: int
    device: torch.device
    generator: torch.Generator
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    negative_prompts: Optional[list[str]] = None
    do_cfg: bool = False
    images: Optional[list[Any]] = None  # validated RGB PIL condition images
    prompt_embeds: Optional[PromptEmbeds] = None
    negative_prompt_embeds: Optional[PromptEmbeds] = None
    image_embeds: Optional[torch.Tensor] = None  # e.g. CLIP vision features
    image_latents: Optional[torch.Tensor] = None  # VAE-encoded condition images, model layout
    # Image-to-image / inpainting (diffcore.tasks): the input picture's latents and the noise it was
    # re-noised with (packed), and the mask at latent resolution (1 = repaint), packed like the latents.
    mask: Any = None  # the validated inpainting mask: a PIL "L" image, white = repaint (diffcore.masks)
    init_latents: Optional[torch.Tensor] = None
    init_noise: Optional[torch.Tensor] = None
    latent_mask: Optional[torch.Tensor] = None
    condition: dict = attrs.field(factory=dict)  # model-specific per-request constants (ids, rope, masks)
    timesteps: Optional[torch.Tensor] = None
    scheduler: Any = None  # a per-request copy, so requests never share solver state
    latents: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None  # decoded pixels in [0, 1], (B, H, W, C) or (B, F, H, W, C)
    audio: Optional[torch.Tensor] = None  # decoded sound track, (B, channels, samples) in [-1, 1]
    audio_sample_rate: Optional[int] = None  # Hz, set by the stage that writes ``audio``
    step_cache: Any = None  # this request's step cache (its per-branch memory and counters), if the engine has one
    timings: dict = attrs.field(factory=dict)
    callback: Any = None  # per-step callback(step, timestep, latents) for this request
    block_callback: Any = None  # block-causal video: callback(block, latents, frames) per finished block
    x0_callback: Any = None  # callback(step, num_steps, x0) after every step: the predicted clean latents (previews)
    extra: dict = attrs.field(factory=dict)  # scratch space for plugin-specific stages
    # A batch of several users' requests (diffcore.engine.rows): the SamplingParams of every row. None for
    # one request, whose rows all follow ``params``; read per-row values with ``per_row``.
    row_params: Optional[list] = None
    stages_done: int = 0  # how many of the pipeline's stages ran on it (validation runs when it is made)
    notices: list = attrs.field(factory=list)  # what its validation noticed, said when it runs (diffcore.notices)
    params_read: set = attrs.field(factory=set)  # the params' fields its stages read (diffcore.ignored)

    def per_row(self, name: str) -> list:
        """``params.<name>`` for every row: ``batch_size`` values (rows of a batch may differ)."""
        rows = self.row_params if self.row_params is not None else [self.params] * self.batch_size
        return [getattr(p, name, None) for p in rows]
