"""Previews: pictures of what a request is becoming, at a few of its denoising steps (``generate(on_preview=...)``,
the server's streamed ``partial_images``).

At every step the denoising loop hands out the predicted clean latents x0 (``DenoisingLoopStage.step_done``:
``x - sigma * v`` for flow models, the scheduler's ``predicted_x0``); at the chosen steps this module decodes
x0 with the model's own ``decode`` hook (each family's unpacking and latent normalisation, exactly as the
final picture) at reduced cost: the latent grid is average-pooled by a power of two until the preview is
about ``PREVIEW_SIDE`` pixels on its long side, decoded, and scaled back up to the request's size. Why not a
latent-to-RGB linear projection ("latent2rgb"): such factors exist only for a few public VAEs (none for the
tiny test VAEs, the demo or new families), and on the demo model a projection fitted by least squares reached
about 15 dB PSNR against the final picture where the half-resolution VAE decode reached 21-25 dB; the pooled
decode costs ``1 / factor**2`` of the final decode (a 1024x1024 FLUX preview: 1/4), at most three times per
request over HTTP.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from .errors import SamplingParamError

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # pixels: the latent grid is pooled while the preview's long side stays at least this
_FULL_SIZE_ONLY: set[type] = set()  # configs whose latents could not be decoded pooled (decoded at full size)


@attrs.frozen
class Preview:
    """One preview of a request: ``index`` (from 0, OpenAI's ``partial_image_index``), after ``step`` of
    ``num_steps`` denoising steps; ``output``: float32 in [0, 1], (B, H, W, 3) at the request's size
    ((B, F, H, W, 3) for a video); ``images``: PIL views of it (a video's first frames)."""

    index: int
    step: int
    num_steps: int
    output: np.ndarray

    @property
    def images(self) -> list:
        from .outputs import to_pil

        return [to_pil(x[0] if x.ndim == 4 else x) for x in self.output]


def preview_steps(num_steps: int, count: int) -> list[int]:
    """The steps (from 0) after which ``count`` previews are taken, spread evenly over ``num_steps``; never the
    last step (its x0 is the final picture), so fewer when there are not enough steps."""
    if count <= 0 or num_steps <= 1:
        return []
    chosen = {min(max(round(k * num_steps / (count + 1)) - 1, 0), num_steps - 2) for k in range(1, count + 1)}
    return sorted(chosen)


def pooling_factor(config, height: int, width: int) -> int:
    """The power of two the latent grid is pooled by: the preview's long side stays >= PREVIEW_SIDE and both
    sides stay multiples of what the model packs (``vae_scale_factor * latent_patch``)."""
    unit = config.vae_scale_factor * max(config.latent_patch, 1)
    factor = 1
    while (max(height, width) // (factor * 2) >= PREVIEW_SIDE and height % (factor * 2 * unit) == 0
           and width % (factor * 2 * unit) == 0):
        factor *= 2
    return factor


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool the last two (spatial) dimensions of (B, C, [F,] h, w)."""
    return F.avg_pool2d(x.flatten(0, -3), factor).unflatten(0, x.shape[:-2])


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., h, w, 3) -> (..., height, width, 3), bilinear."""
    if pixels.shape[-3:-1] == (height, width):
        return pixels
    flat = pixels.flatten(0, -4).permute(0, 3, 1, 2).float()
    out = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
    return out.permute(0, 2, 3, 1).unflatten(0, pixels.shape[:-3])


def decode_preview(config, components: dict, x0: torch.Tensor, req) -> torch.Tensor:
    """x0 (the request's latent layout) -> float32 pixels in [0, 1] at the request's size, channels last."""
    factor = 1 if type(config) in _FULL_SIZE_ONLY else pooling_factor(config, req.height, req.width)
    if factor > 1:
        small = attrs.evolve(req, height=req.height // factor, width=req.width // factor)
        try:
            pooled = config.pack_latents(_pool(config.unpack_latents(x0, req), factor), small)
            return _resize(config.decode(components, pooled, small), req.height, req.width)
        except Exception as exc:  # noqa: BLE001 (a layout the pooled path cannot take: exact size, logged once)
            _FULL_SIZE_ONLY.add(type(config))
            log.warning("previews of %s are decoded at full size (pooled decoding failed: %s)",
                        type(config).__name__, exc)
    return config.decode(components, x0, req).float()


def check(on_preview, partial_images) -> int:
    """The number of previews asked for (SamplingParamError names a bad value)."""
    if on_preview is not None and not callable(on_preview):
        raise SamplingParamError("on_preview", f"expected a function, got {type(on_preview).__name__}")
    if partial_images is None:
        return 3 if on_preview is not None else 0
    if isinstance(partial_images, bool) or not isinstance(partial_images, int) or partial_images < 0:
        raise SamplingParamError("partial_images", f"partial_images must be an integer >= 0, got {partial_images!r}")
    if on_preview is None and partial_images:
        raise SamplingParamError("partial_images", "partial_images needs on_preview (the function that receives them)")
    return partial_images


def x0_callback(config, components: dict, req, on_preview: Callable[[Preview], None], count: int
                ) -> Optional[Callable]:
    """The request's ``x0_callback``: at the chosen steps, ``on_preview(Preview)`` with x0 decoded."""
    if count <= 0:
        return None
    state = {"steps": None, "index": 0}

    def callback(step: int, num_steps: int, x0: torch.Tensor) -> None:
        if state["steps"] is None:
            state["steps"] = set(preview_steps(num_steps, count))
        if step not in state["steps"]:
            return
        pixels = decode_preview(config, components, x0, req)
        on_preview(Preview(state["index"], step + 1, num_steps, pixels.float().cpu().numpy()))
        state["index"] += 1

    return callback
